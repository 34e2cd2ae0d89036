"""What an architecture plugin provides, and what the engine hands it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from torch import nn

from genserve.attention.base import AttentionImpl, AttentionMetadata, AttentionSpec
from genserve.distributed.state import TPGroup, get_tp_group
from genserve.layers.custom_op import LayerOps, use_layer_ops
from genserve.layers.quantization.base import QuantizationConfig, QuantMethod
from genserve.layers.weights import weight_loader_of
from genserve.multimodal.processor import MultiModalProcessor
from genserve.multimodal.rows import merged_image_rows

if TYPE_CHECKING:
    from genserve.engine.scheduler import ScheduledSeq
    from genserve.lora.runtime import LoRABatch
    from genserve.multimodal.inputs import MultiModalInputs, StepImages


@dataclass
class ModelContext:
    """Construction-time choices made by the engine and backend, never by the model."""

    dtype: torch.dtype
    device: torch.device
    attention_cls: type[AttentionImpl]
    # The checkpoint's quantization, asked per linear layer with its checkpoint prefix
    # (``quant.get_quant_method(layer, prefix)``); None: every layer dense.
    quant: QuantizationConfig | None = None
    tp: TPGroup = field(default_factory=get_tp_group)
    # Next choices, in the backend's order, for layers the first one cannot serve
    # (e.g. a kernel without softcap under Gemma-2).
    attention_fallbacks: tuple[type[AttentionImpl], ...] = ()
    # The backend's layer implementations (``Backend.layer_ops()``), bound by each layer when
    # ``build_model`` constructs the model; the default runs the PyTorch reference everywhere.
    layer_ops: LayerOps = field(default_factory=LayerOps)

    def attention_for(self, spec: AttentionSpec) -> AttentionImpl:
        reasons = []
        for cls in (self.attention_cls, *self.attention_fallbacks):
            why = cls.supports(spec, self.dtype, self.device)
            if why is None:
                return cls(spec)
            reasons.append(f"{cls.name}: {why}")
        raise ValueError("no attention implementation serves this layer (" + "; ".join(reasons) + ")")


@dataclass
class ForwardBatch:
    """One step's inputs beyond token ids and positions."""

    attn: AttentionMetadata
    kv_caches: list[torch.Tensor]
    # Encoder-decoder models: per scheduled sequence, in batch order, what ``encode`` returned
    # for its prompt (e.g. cross-attention keys and values). None for decoder-only models.
    encoder: list | None = None
    # LoRA: the step's per-row adapters (``LoRAManager.batch_for``; tensor-parallel workers get
    # them from rank 0 with the step's other inputs); None when no row uses one. The runner
    # makes them current for the adapted linear layers around the forward (``LoRAManager.active``).
    lora: LoRABatch | None = None
    # Vision-language models: what the model's ``step_images`` built for this step, e.g. the
    # image embeddings and the rows they replace (``ImageRows``), or the cross-attention inputs
    # (``CrossImages``); None when no scheduled row needs an image.
    images: StepImages | None = None


@dataclass(frozen=True)
class KVCacheSpec:
    """The per-layer KV-cache shape a model needs (this rank's heads)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class CausalLM(nn.Module):
    """Base of decoder-only architectures.

    Subclasses build their layers in ``__init__(config, ctx)``, implement ``forward`` and
    ``compute_logits``, and describe their checkpoint names with ``stacked_params``
    (checkpoint fragment -> (parameter fragment, shard id)) and ``skip_weights``.
    """

    # ("q_proj", ("qkv_proj", "q")) means: a checkpoint tensor named "...q_proj..." fills the
    # "q" part of parameter "...qkv_proj...".
    stacked_params: tuple[tuple[str, tuple[str, object]], ...] = ()
    skip_weights: tuple[str, ...] = ("rotary_emb.inv_freq",)

    # Encoder-decoder models (T5) set this and implement ``encode``. The engine then feeds each
    # request's prompt to ``encode`` once, at its first step, and runs the decoder from
    # ``decoder_start_token_id`` through the paged cache like any decoder-only model.
    is_encoder_decoder: bool = False
    decoder_start_token_id: int | None = None

    # A known length (prompt + generated tokens) at which a decoding sequence's cache goes stale
    # and the engine recomputes it from scratch (Phi-3 longrope turning to its long factors);
    # models that set it also run without prefix caching. None: never.
    recompute_at_length: int | None = None

    # Vision-language models set the placeholder token their processor expands each image
    # into, and implement ``embed_images``; the engine then runs the vision encoder once per
    # request and hands the step's image rows to ``forward`` in ``ForwardBatch.images``.
    # None: a text-only model (the server refuses images for it).
    image_token_id: int | None = None
    # How the server calls the checkpoint's transformers processor for a prompt with images
    # (a placeholder per image in the text, by default; Idefics v1 takes an interleaved list).
    processor_cls: ClassVar[type[MultiModalProcessor]] = MultiModalProcessor

    def __init__(self, config, ctx: ModelContext):
        super().__init__()
        self.config, self.ctx = config, ctx

    def kv_cache_spec(self) -> KVCacheSpec:
        """This rank's per-layer KV-cache shape (what ``ModelRunner.allocate_kv_cache`` allocates)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] for the flat token rows."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab_size] for hidden rows [N, hidden]."""
        raise NotImplementedError

    def encode(self, prompts: list[list[int]]) -> list:
        """Encoder-decoder models: one state per prompt, handed back in ``ForwardBatch.encoder``."""
        raise NotImplementedError

    def embed_images(self, inputs: list[MultiModalInputs]) -> list[torch.Tensor]:
        """Vision-language models: per request, the embeddings [len(positions), hidden] of
        all its images in prompt order, one row per placeholder token. Called once per step
        with every request that needs them, so the vision encoder runs batched. (Models that
        cross-attend to their images return their own per-request state, see ``step_images``.)"""
        raise NotImplementedError

    def step_images(self, scheduled: list[ScheduledSeq], device: torch.device) -> StepImages | None:
        """Vision-language models: this step's image inputs for ``forward`` (``ForwardBatch.images``),
        running ``embed_images`` for the requests that need it first. Default: the image
        embeddings written over their placeholder rows (``rows.merged_image_rows``); a model
        whose text rows cross-attend to the images instead overrides it (Idefics v1)."""
        return merged_image_rows(self, scheduled, device)

    def rename_weight(self, name: str) -> str | None:
        """Map a checkpoint tensor name to this model's; None drops it."""
        return name

    def load_weights(self, weights: Iterable[tuple[str, object]]) -> set[str]:
        """Fill parameters from ``(name, tensor or lazy slice)`` pairs; returns names loaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            name = self.rename_weight(ckpt_name)
            if name is None or any(s in name for s in self.skip_weights):
                continue
            for fragment, (target, shard_id) in self.stacked_params:
                if fragment in name:
                    pname = name.replace(fragment, target)
                    if pname in params:
                        weight_loader_of(params[pname])(params[pname], tensor, shard_id)
                        loaded.add(pname)
                        break
            else:
                if name not in params:
                    continue  # e.g. a tied lm_head or an unused buffer
                param = params[name]
                weight_loader_of(param)(param, tensor)
                loaded.add(name)
        return loaded

    def quantized_modules(self) -> Iterable[tuple[nn.Module, QuantMethod]]:
        """``(module, QuantMethod)`` for every module whose parameters a quant method owns."""
        for module in self.modules():
            quant = getattr(module, "quant", None)
            if isinstance(quant, QuantMethod):
                yield module, quant

    def process_weights_after_loading(self) -> None:
        for module, quant in list(self.quantized_modules()):
            quant.process_after_loading(module)

    def init_dummy_quantized(self, generator: torch.Generator) -> set[int]:
        """``--load-format dummy``: let each quant method fill its own parameters with valid
        random values (packed integers, positive scales); returns the ``id()``s it filled."""
        filled: set[int] = set()
        for module, quant in self.quantized_modules():
            filled |= quant.init_dummy(module, generator)
        return filled


M = TypeVar("M", bound=CausalLM)


def build_model(model_cls: type[M], config, ctx: ModelContext) -> M:
    """``model_cls(config, ctx)`` with its tensors on ``ctx.device`` and ``ctx.layer_ops`` current,
    so every layer binds the backend's implementation as it is constructed (``CustomOp``)."""
    with torch.device(ctx.device), use_layer_ops(ctx.layer_ops):
        return model_cls(config, ctx)
