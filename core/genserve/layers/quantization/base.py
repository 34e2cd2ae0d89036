"""How a quantizer plugs into linear layers (vLLM's ``QuantizationConfig`` / ``QuantizeMethodBase``).

Two objects, as in vLLM:

* a ``QuantizationConfig`` is built once per model from the checkpoint's ``quantization_config``
  (config.json) or ``quantize_config.json`` and the ``--quantize`` flag. It is asked per layer,
  with the layer and the layer's checkpoint prefix (``get_quant_method(layer, prefix)``), and
  answers with a method or None (that layer stays unquantized: ``lm_head``, ignore lists,
  per-layer targets). Its registry key is the ``--quantize`` name (TGI's names).
* a ``QuantMethod`` creates one layer's parameters (their dtype, shape, declared dimensions and
  weight loaders), repacks them once loaded and computes ``x @ W.T + b`` from them.

Each format owns its checkpoint layout: parameters declare which dimension is input, output and
packed (``genserve.layers.weights.set_weight_dims``), so the tensor-parallel loaders in
``layers/linear.py`` narrow any tensor without knowing the format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genserve.layers.weights import set_weight_dims

logger = logging.getLogger(__name__)


class QuantizationError(ValueError):
    """A checkpoint's quantization cannot be served as configured; the message names the layer
    (when there is one) and the reason."""


class QuantMethod:
    """One layer's quantized parameters and matmul."""

    name: ClassVar[str] = "?"
    # Backends that can run this method; None means any.
    backends: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, quant_config: dict | None = None):
        self.quant_config = quant_config or {}

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int,
                       dtype: torch.dtype, weight_loader) -> None:
        """Add parameters to ``layer`` (this rank's ``in_features``/``out_features``), each with
        its dimensions declared (``set_weight_dims``); ``weight_loader(param, loaded, shard_id)``
        fills them."""
        raise NotImplementedError

    def process_after_loading(self, layer: nn.Module) -> None:
        """Repack weights once loaded (e.g. into a kernel's layout)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def init_dummy(self, layer: nn.Module, generator: torch.Generator) -> set[int]:
        """``--load-format dummy``: fill the parameters this method owns with valid random values
        (packed integers, positive scales); returns the ``id()`` of each parameter filled. The
        default fills nothing and leaves the float parameters to the model's random init."""
        return set()


class EmbeddingMethod(QuantMethod):
    """A quantized vocabulary table ``[rows, hidden]``: ``create_weights(layer, hidden, rows,
    dtype, weight_loader)`` registers its tensors, ``embedding(layer, ids)`` gives the rows
    ``ids`` (int64 ``[T]``) as ``[T, hidden]`` in the model's dtype, and ``apply(layer, hidden,
    bias)`` the logits ``hidden [T, hidden] @ table.T`` (the LM head). A tied LM head shares its
    embedding's method object and calls it with itself as ``layer``."""

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UnquantizedLinear(QuantMethod):
    name = "none"

    def create_weights(self, layer, in_features, out_features, dtype, weight_loader):
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        set_weight_dims(weight, input_dim=1, output_dim=0)
        weight.weight_loader = weight_loader
        layer.register_parameter("weight", weight)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)


@dataclass
class LinearKernelChooser:
    """Picks a ``MPLinearKernel`` per layer in the backend's preference order (the engine builds
    one from ``Backend.linear_kernel_preference`` and ``plugins.linear_kernels``).

    ``registry`` is anything with ``in`` and ``get(name)`` (a ``Registry`` or a dict). A layer
    served by a later choice than the first logs one line per (kernel, reason).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    preference: tuple[str, ...] = ("torch_wna16",)
    registry: Any = None  # a Registry or a dict (see above)
    _logged: set[tuple[str, str | None]] = field(default_factory=set, repr=False)

    def __post_init__(self):
        if self.registry is None:
            from genserve.layers.quantization.kernels import TorchWNA16Kernel

            self.registry = {TorchWNA16Kernel.name: TorchWNA16Kernel}

    def choose(self, config, prefix: str):
        """The kernel class for ``config`` (a ``WNA16Config``); QuantizationError naming the layer
        when none can serve it."""
        from genserve.layers.quantization.kernels import choose_linear_kernel

        try:
            cls = choose_linear_kernel(config, self.device, self.preference, self.registry)
        except ValueError as exc:
            raise QuantizationError(f"layer {prefix or '?'}: {exc}") from None
        first = self.preference[0] if self.preference else None
        if cls.name != first and first in self.registry:
            why = self.registry.get(first).can_implement(config, self.device)
            if (cls.name, why) not in self._logged:
                self._logged.add((cls.name, why))
                logger.info("linear kernel %s cannot take layers like %s (%s): they use %s",
                            first, prefix, why, cls.name)
        return cls


class QuantizationConfig:
    """A model's quantization, asked per layer (vLLM's ``QuantizationConfig``).

    Subclasses are registered under their ``--quantize`` name through
    ``genserve_register_quantizers`` and built with ``from_config``.
    """

    name: ClassVar[str] = "?"
    # Backends that can run it; None means any.
    backends: ClassVar[tuple[str, ...] | None] = None
    # True for formats that read integer weights a tool wrote (GPTQ, AWQ, ...): the checkpoint
    # must carry a quantization config. False for methods that quantize dense weights at load.
    requires_checkpoint_config: ClassVar[bool] = False
    # True for methods that quantize dense weights at load AND read checkpoints already in their
    # format (fp8: ``--quantize fp8`` and ``quant_method: fp8`` checkpoints).
    accepts_checkpoint_config: ClassVar[bool] = False

    def __init__(self, kernels: LinearKernelChooser | None = None):
        self.kernels = kernels or LinearKernelChooser()

    @classmethod
    def from_config(cls, config: dict | None, kernels: LinearKernelChooser | None = None
                    ) -> QuantizationConfig:
        """Build from the checkpoint's quantization config (None when it has none). Raises
        QuantizationError for settings the format does not support (bits, group size, ...)."""
        return cls(kernels)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        """The method for the linear ``layer`` whose checkpoint tensors start with ``prefix``
        (e.g. ``model.layers.0.self_attn.qkv_proj``); None leaves it unquantized."""
        raise NotImplementedError

    def get_embedding_method(self, layer: nn.Module, prefix: str) -> EmbeddingMethod | None:
        """The method for a vocabulary table ``layer`` (``VocabParallelEmbedding`` or
        ``ParallelLMHead``, checkpoint prefix ``model.embed_tokens`` / ``lm_head``); None (every
        format but GGUF) keeps it a dense ``weight``."""
        return None


class PerLayerQuantConfig(QuantizationConfig):
    """Methods that quantize every linear layer's dense weights at load (fp8, eetq): one
    ``method_cls`` instance per layer."""

    method_cls: ClassVar[type[QuantMethod]]

    def __init__(self, kernels=None, config: dict | None = None):
        super().__init__(kernels)
        self.config = config

    @classmethod
    def from_config(cls, config, kernels=None):
        return cls(kernels, config)

    def get_quant_method(self, layer, prefix):
        return self.method_cls(self.config)
