"""Serving an architecture no plugin registers through its transformers modelling code.

TGI serves a model it has no implementation of through transformers; vLLM's "Transformers
backend" does it without giving up its engine. This follows vLLM: the transformers module runs
as it is, on the engine's flat token rows (one "batch" row holding every scheduled token, with
each token's own position id), and its attention layers call genserve's paged attention through
transformers' attention-interface registry (``AttentionInterface.register``). Continuous
batching, chunked prefill, prefix caching and the paged KV cache therefore work as for a native
model. Transformers builds no mask for an attention implementation it does not know
(``masking_utils._preprocess_mask_arguments``): causality and sequence boundaries come from the
paged attention's metadata instead.

What cannot work this way is refused at construction with the reason (``unsupported_reason``):
encoder-decoder and non-causal models, models without attention layers that take the
interface (state-space or convolutional layers would mix tokens of different sequences), and
tensor parallelism or quantization (the transformers module holds whole, dense weights).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
import torch
from torch import nn

from genserve.attention.base import AttentionSpec
from genserve.layers.attention import Attention
from genserve.models.base import CausalLM, ForwardBatch, KVCacheSpec, ModelContext

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "genserve_paged"

# The step being run: (its ForwardBatch, the model's paged attention layers by layer index).
# A context variable rather than keyword arguments, because not every transformers model hands
# its ``**kwargs`` down to the attention call.
_STEP: ContextVar[tuple[ForwardBatch, nn.ModuleList] | None] = ContextVar("genserve_fallback_step",
                                                                         default=None)


def paged_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask, scaling: float | None = None,
                            dropout: float = 0.0, sliding_window: int | None = None, **kwargs):
    """transformers' attention-function signature over genserve's paged attention.

    ``query`` [1, H, T, D], ``key``/``value`` [1, Hkv, T, D] (rotary already applied by the
    module): the step's T flat token rows. Returns ``([1, T, H, D], None)`` as transformers'
    attention functions do. Raises RuntimeError outside a genserve step, and when the call's
    scaling or sliding window differs from what the layer was built with (a model whose
    attention changes at run time cannot be served this way: refusing beats a wrong answer).
    """
    step = _STEP.get()
    if step is None:
        raise RuntimeError(f"the {ATTN_IMPLEMENTATION!r} attention runs only inside genserve's engine")
    batch, layers = step
    idx = int(module.layer_idx)  # type: ignore[arg-type]  # transformers sets it on every attention module
    layer = layers[idx]
    assert isinstance(layer, Attention)
    spec = layer.spec
    if (scaling is not None and abs(scaling - spec.scale) > 1e-6 * spec.scale) or \
            (sliding_window or None) != spec.sliding_window:
        raise RuntimeError(f"layer {idx} called attention with scaling {scaling} and "
                           f"sliding window {sliding_window}; it was built for {spec.scale} and "
                           f"{spec.sliding_window}")
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    out = layer.impl.forward(q.contiguous(), k.contiguous(), v.contiguous(),
                             batch.kv_caches[idx], batch.attn)
    return out.unsqueeze(0), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


def _attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """The modules that call the attention interface, by layer index: those with a
    ``layer_idx`` and a ``scaling`` (every transformers attention class since the interface)."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        idx, scaling = getattr(module, "layer_idx", None), getattr(module, "scaling", None)
        if isinstance(idx, int) and isinstance(scaling, float) and hasattr(module, "config"):
            found.setdefault(idx, module)
    return found


def _sliding_window(config, module: nn.Module, layer_idx: int) -> int | None:
    """The window a layer attends over, by transformers' conventions: the module's own
    ``sliding_window`` (Qwen2 style, None on full-attention layers), else ``config.layer_types``
    naming sliding layers, else ``config.sliding_window`` for every layer (Mistral style)."""
    window: object
    if hasattr(module, "sliding_window"):
        window = module.sliding_window
    elif getattr(config, "layer_types", None):
        window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
    else:
        window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) else None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def unsupported_reason(config, ctx: ModelContext | None = None) -> str | None:
    """Why the fallback cannot serve ``config`` (None when it can). Cheap: no weights built."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not served by the transformers fallback"
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"transformers has no causal-LM class for model type {config.model_type!r}"
    for name in ("num_attention_heads", "num_hidden_layers", "hidden_size"):
        if not isinstance(getattr(config, name, None), int):
            return f"its config has no {name}"
    if ctx is not None:
        if ctx.tp.size > 1:
            return "tensor parallelism is not available through the transformers fallback"
        if ctx.quant is not None:
            return "quantized weights are not available through the transformers fallback"
    return None


class TransformersForCausalLM(CausalLM):
    """Any transformers causal LM, run by genserve's engine with paged attention."""

    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        why = unsupported_reason(config, ctx)
        if why is not None:
            raise ValueError(why)
        from transformers import AutoModelForCausalLM

        _register_attention()
        self.hf = AutoModelForCausalLM.from_config(config, dtype=ctx.dtype,
                                                   attn_implementation=ATTN_IMPLEMENTATION).eval()
        modules = _attention_modules(self.hf)
        layers = config.num_hidden_layers
        if sorted(modules) != list(range(layers)):
            raise ValueError(f"{type(self.hf).__name__} has attention modules for layers "
                             f"{sorted(modules)}, not one per layer (0..{layers - 1}): mixed layer "
                             "kinds (state-space, convolution) cannot run on the paged cache")
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.num_kv_heads, self.head_dim = num_kv, _head_dim(config)
        self.attn = nn.ModuleList()
        for i in range(layers):
            m = modules[i]
            if not getattr(m, "is_causal", True):
                raise ValueError(f"layer {i} of {type(self.hf).__name__} is not causal")
            softcap = getattr(m, "attn_logit_softcapping", None)
            scaling = getattr(m, "scaling")  # a float: _attention_modules checked it
            spec = AttentionSpec(config.num_attention_heads, self.head_dim, num_kv, float(scaling),
                                 sliding_window=_sliding_window(config, m, i),
                                 logit_softcap=softcap if isinstance(softcap, float) else None)
            self.attn.append(Attention(i, spec, ctx))
        logger.info("model type %r: no genserve module registers it, serving %s through the "
                    "transformers fallback (paged attention, continuous batching)",
                    config.model_type, type(self.hf).__name__)

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.config.num_hidden_layers, self.num_kv_heads, self.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        token = _STEP.set((batch, self.attn))
        try:
            out = self.hf.base_model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        finally:
            _STEP.reset(token)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head, with the output scalings transformers applies after it for the
        configurations that declare one (Cohere's ``logit_scale``, Granite's
        ``logits_scaling``, Gemma-2's ``final_logit_softcapping``)."""
        logits = self.hf.get_output_embeddings()(hidden)
        c = self.config
        if isinstance(getattr(c, "logit_scale", None), (int, float)):
            logits = logits * c.logit_scale
        if isinstance(getattr(c, "logits_scaling", None), (int, float)):
            logits = logits / c.logits_scaling
        cap = getattr(c, "final_logit_softcapping", None)
        if isinstance(cap, (int, float)):
            logits = torch.tanh(logits / cap) * cap
        return logits

    def rename_weight(self, name: str) -> str | None:
        return "hf." + name
