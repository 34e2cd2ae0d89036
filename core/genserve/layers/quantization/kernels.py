"""Mixed-precision linear kernels: the seam between weight formats and the hardware that runs them.

A 4- or 8-bit weight format (GPTQ, AWQ, compressed-tensors ``pack-quantized``, Marlin) only
decides how a checkpoint stores integer weights, scales and zero points. After loading, the
format's quantizer unpacks them into one canonical form, ``WNA16Weights``, and hands that to a
``MPLinearKernel`` chosen for the layer (vLLM's ``MPLinearKernel`` / ``choose_mp_linear_kernel``).
The kernel repacks the weights into its own layout once and computes ``x @ W.T + b`` on every
call. Kernels are plugins (``genserve_register_linear_kernels``); a backend names the ones it
prefers, in order (``Backend.linear_kernel_preference``), and the first that can implement the
layer's configuration wins, so a format never names a kernel and a kernel never names a format.

Dequantization rule of the canonical form (the one GPTQ, AWQ and compressed-tensors share):

    W[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n],    g(k) = k // group_size

with ``q`` and ``z`` unsigned integers in ``[0, 2**bits)``; symmetric formats have no stored zero
points and use ``z = 2**(bits - 1)``. Formats whose groups have a float minimum instead of an
integer zero point (GGUF ``Q4_1``, ``Q4_K``: ``w = d * q + m``) add a float ``offset`` per group,
``W[n, k] = (q - z) * s + o[g(k), n]``; only kernels that declare ``supports_offsets`` take them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class WNA16Config:
    """What a kernel must implement for one linear layer (this rank's slice).

    ``group_size`` equals ``in_features`` for per-channel quantization. ``act_order`` means the
    checkpoint grouped input features out of order (GPTQ ``desc_act``): the canonical weights then
    come already permuted so that groups are contiguous, with ``WNA16Weights.perm`` to gather the
    activations' columns the same way.
    """

    bits: int
    group_size: int
    has_zero_points: bool
    act_order: bool
    in_features: int
    out_features: int
    act_dtype: torch.dtype
    # A float offset per group (``WNA16Weights.offsets``): GGUF's float minimums.
    has_offsets: bool = False
    # The dtype a fast kernel may run the matmul in when it differs from ``act_dtype`` (None:
    # ``act_dtype``). GGUF sets bfloat16: torch's int4 CPU matmul is fast only in bf16, and a
    # GGUF checkpoint is already approximate (llama.cpp itself multiplies 8-bit activations).
    compute_dtype: torch.dtype | None = None

    @property
    def num_groups(self) -> int:
        return -(-self.in_features // self.group_size)


@dataclass
class WNA16Weights:
    """Unpacked integer weights in the canonical form, on the layer's device.

    - ``qweight``: uint8 ``[in_features, out_features]``, values in ``[0, 2**bits)``.
    - ``scales``: ``[num_groups, out_features]`` in the activation dtype (or float32).
    - ``zeros``: uint8 ``[num_groups, out_features]`` or None (symmetric: ``2**(bits-1)``).
    - ``perm``: int64 ``[in_features]`` or None: row ``k`` of ``qweight`` holds input feature
      ``perm[k]``, so the layer computes ``x[..., perm] @ dequant(qweight)``.
    - ``offsets``: float ``[num_groups, out_features]`` or None: added to every dequantized
      weight of the group (``WNA16Config.has_offsets``).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    offsets: torch.Tensor | None = None

    def zero_points(self, bits: int) -> torch.Tensor:
        """``[num_groups, out_features]`` zero points, implicit ones filled in (uint8)."""
        if self.zeros is not None:
            return self.zeros
        return torch.full_like(self.scales, 2 ** (bits - 1), dtype=torch.uint8)

    def dequantize(self, config: WNA16Config, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` in the ORIGINAL input order."""
        dtype = dtype or config.act_dtype
        groups = torch.arange(config.in_features, device=self.qweight.device) // config.group_size
        z = self.zero_points(config.bits).float()[groups]          # [K, N]
        s = self.scales.float()[groups]                             # [K, N]
        w = (self.qweight.float() - z) * s                          # [K, N], permuted rows
        if self.offsets is not None:
            w = w + self.offsets.float()[groups]
        if self.perm is not None:
            dense = torch.empty_like(w)
            dense[self.perm] = w
            w = dense
        return w.t().contiguous().to(dtype)


class MPLinearKernel:
    """A mixed-precision (integer weight, 16-bit activation) linear kernel.

    Lifecycle: ``can_implement`` is asked at construction time (cheap, no tensors); after the
    checkpoint is loaded the quantizer calls ``process_weights(layer, weights)`` once, which may
    replace the layer's loading parameters with the kernel's own buffers; ``apply`` then runs on
    every forward and must be CUDA-graph safe on GPUs (no host syncs, no allocation that depends
    on values).
    """

    name: ClassVar[str] = "?"
    # Whether ``process_weights`` honours ``WNA16Weights.offsets``; the chooser passes over
    # kernels that do not for layers with offsets (so a kernel written before them stays exact).
    supports_offsets: ClassVar[bool] = False

    def __init__(self, config: WNA16Config):
        self.config = config

    @classmethod
    def can_implement(cls, config: WNA16Config, device: torch.device) -> str | None:
        """None when this kernel serves ``config`` on ``device``; else the reason it cannot."""
        raise NotImplementedError

    def process_weights(self, layer: nn.Module, weights: WNA16Weights) -> None:
        """Repack ``weights`` into this kernel's layout and keep them on ``layer``."""
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., out_features]`` in ``x``'s dtype."""
        raise NotImplementedError


class TorchWNA16Kernel(MPLinearKernel):
    """The reference: dequantize the whole weight on every call, then ``F.linear``.

    Runs anywhere and serves every configuration; it is what faster kernels are tested against,
    and the last resort in every backend's preference list.
    """

    name = "torch_wna16"
    supports_offsets = True

    @classmethod
    def can_implement(cls, config, device):
        return None if config.bits in (2, 3, 4, 8) else f"{config.bits}-bit weights"

    def process_weights(self, layer, weights):
        layer.register_buffer("wna16_qweight", weights.qweight, persistent=False)
        layer.register_buffer("wna16_scales", weights.scales, persistent=False)
        layer.register_buffer("wna16_zeros", weights.zero_points(self.config.bits), persistent=False)
        layer.register_buffer("wna16_perm", weights.perm, persistent=False)
        layer.register_buffer("wna16_offsets", weights.offsets, persistent=False)

    def apply(self, layer, x, bias):
        w = WNA16Weights(layer.wna16_qweight, layer.wna16_scales, layer.wna16_zeros, layer.wna16_perm,
                         layer.wna16_offsets)
        return F.linear(x, w.dequantize(self.config, x.dtype), bias)


def choose_linear_kernel(config: WNA16Config, device: torch.device, preference: tuple[str, ...],
                         registry) -> type[MPLinearKernel]:
    """The first kernel in ``preference`` that is registered and can implement ``config``.

    Raises ValueError naming every candidate and why it was passed over.
    """
    reasons = []
    for name in preference:
        if name not in registry:
            reasons.append(f"{name}: not installed")
            continue
        cls = registry.get(name)
        # (FP8 layers share this chooser with their own config type, which has no offsets.)
        offsets = isinstance(config, WNA16Config) and config.has_offsets
        why = ("float group offsets (GGUF minimums)" if offsets and not cls.supports_offsets
               else cls.can_implement(config, device))
        if why is None:
            return cls
        reasons.append(f"{name}: {why}")
    raise ValueError("no linear kernel implements this layer (" + "; ".join(reasons) + ")")
