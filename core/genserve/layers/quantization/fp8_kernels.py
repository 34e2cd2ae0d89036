"""FP8 (float8_e4m3fn) linear kernels: the seam between ``--quantize fp8`` and the hardware.

The FP8 method quantizes each dense weight once, per output channel, into one canonical form

    W[n, k] ~= q[n, k] * s[n],    q float8_e4m3fn [N, K],  s float32 [N]

and hands it to an ``FP8LinearKernel`` picked from the backend's ``linear_kernel_preference``
(only the names registered as ``FP8LinearKernel`` subclasses are considered for FP8 layers).
``TorchFP8Kernel`` is the reference (dequantize, then ``F.linear``): it runs anywhere and is what
the fast kernels are tested against. A W8A8 kernel also quantizes the activations, per token
(row), with ``quantize_fp8_per_token`` (the dynamic per-token scheme of vLLM's ``Fp8LinearOp``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from genserve.layers.quantization.kernels import choose_linear_kernel

if TYPE_CHECKING:
    from genserve.layers.quantization.base import LinearKernelChooser

logger = logging.getLogger(__name__)
_logged: set[tuple[str, str]] = set()

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_EPS = 1e-12  # smallest amax used for a scale, so an all-zero row gets a finite one


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> (float8_e4m3fn ``[N, K]``, float32 scale ``[N, 1]``) with
    ``weight ~= q * scale``; the largest magnitude of each row maps to 448."""
    scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=FP8_EPS) / FP8_MAX
    q = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token activation quantization: ``x [M, K]`` -> (float8_e4m3fn ``[M, K]``,
    float32 scale ``[M, 1]``) with ``x ~= q * scale``.

    Device ops only (amax, divide, clamp, cast): no host sync, so it can be captured in a CUDA
    graph. The scale layout is ``torch._scaled_mm``'s row-wise ``scale_a``.
    """
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=FP8_EPS) / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


@dataclass(frozen=True)
class FP8LinearConfig:
    """What an FP8 kernel must implement for one linear layer (this rank's slice)."""

    in_features: int
    out_features: int
    act_dtype: torch.dtype
    # How a checkpoint's activations were quantized (``fp8_checkpoint.py``): None (weight-only,
    # ``--quantize fp8``), "dynamic" (per token) or "static" (``layer.fp8_input_scale`` [1],
    # registered by the method before ``process_weights``). The reference reproduces it; W8A8
    # kernels quantize activations per token whatever it says.
    activations: str | None = None


class FP8LinearKernel:
    """An FP8-weight linear kernel (lifecycle as ``MPLinearKernel``'s: ``can_implement`` at
    construction, ``process_weights`` once after loading, ``apply`` per forward, CUDA-graph safe
    on GPUs)."""

    name: ClassVar[str] = "?"

    def __init__(self, config: FP8LinearConfig):
        self.config = config

    @classmethod
    def can_implement(cls, config, device: torch.device) -> str | None:
        """None when this kernel serves ``config`` (an ``FP8LinearConfig``) on ``device``; else
        the reason it cannot."""
        raise NotImplementedError

    def process_weights(self, layer: nn.Module, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        """Keep ``qweight`` (float8_e4m3fn ``[N, K]``) and ``scale`` (float32 ``[N, 1]``) on
        ``layer`` in this kernel's layout. Every kernel stores the weight as ``layer.weight_fp8``."""
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., out_features]`` in ``x``'s dtype."""
        raise NotImplementedError


class TorchFP8Kernel(FP8LinearKernel):
    """The reference: upcast the whole weight on every call, then ``F.linear`` (weight-only,
    activations stay in 16/32 bits). Runs on any device with float8 types; slow on GPUs."""

    name = "torch_fp8"

    @classmethod
    def can_implement(cls, config, device):
        return None if isinstance(config, FP8LinearConfig) else "not an FP8 layer"

    def process_weights(self, layer, qweight, scale):
        layer.register_buffer("weight_fp8", qweight)
        layer.register_buffer("weight_scale", scale.to(self.config.act_dtype))

    def apply(self, layer, x, bias):
        w = layer.weight_fp8.to(x.dtype) * layer.weight_scale
        if self.config.activations == "dynamic":
            q, scale = quantize_fp8_per_token(x)
            x = (q.float() * scale).to(x.dtype)
        elif self.config.activations == "static":
            scale = layer.fp8_input_scale
            x = ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)
        return F.linear(x, w, bias)


def choose_fp8_kernel(kernels: LinearKernelChooser | None, config: FP8LinearConfig,
                      prefix: str) -> type[FP8LinearKernel]:
    """The first ``FP8LinearKernel`` in the backend's preference that implements ``config``;
    ``TorchFP8Kernel`` when none does (the reasons are logged once per kernel and reason)."""
    if kernels is None:
        return TorchFP8Kernel
    registry = kernels.registry
    names = tuple(n for n in kernels.preference
                  if n in registry and isinstance(registry.get(n), type)
                  and issubclass(registry.get(n), FP8LinearKernel))
    try:
        # The chooser is shared with the integer-weight kernels (it only asks can_implement);
        # ``names`` holds FP8 kernels only, so the class it returns is one.
        chosen = choose_linear_kernel(config, kernels.device, names, registry)  # type: ignore[arg-type]
        assert issubclass(chosen, FP8LinearKernel)
        return chosen
    except ValueError as exc:
        if names:
            key = (str(exc), "")
            if key not in _logged:
                _logged.add(key)
                logger.info("FP8 layers like %s use the dequantizing reference: %s", prefix, exc)
        return TorchFP8Kernel
