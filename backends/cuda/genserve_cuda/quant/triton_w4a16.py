"""``TritonW4A16Kernel``: the ``MPLinearKernel`` that runs 4/8-bit weights on CUDA GPUs.

The weights are repacked once (``genserve_cuda.kernels.w4a16.pack_wna16``); every call then runs
one Triton GEMM launch (split-K tensor-core tiles with inline-PTX dequantization up to
``DOT_MAX_M`` rows, one decode row padded to a 16-row tile) or, for prefill-sized inputs, a
dequantize-to-scratch kernel plus cuBLAS (the scratch is one buffer per device and dtype,
shared by all layers: ``SCRATCH``).
Act-order layers gather ``x``'s columns with the permutation first (one ``index_select``,
capturable in a CUDA graph); the weight rows were already permuted by the quantizer.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from genserve.layers.quantization.kernels import MPLinearKernel, WNA16Config, WNA16Weights
from genserve_cuda._triton import triton_unavailable_reason

SUPPORTED_BITS = (4, 8)
PLANE_ROWS = 16  # a group must cover whole 16-row planes of the packed layout


def shape_unsupported_reason(config: WNA16Config) -> str | None:
    """Why the kernel's layout cannot hold ``config`` (device aside), or None."""
    if config.bits not in SUPPORTED_BITS:
        return f"{config.bits}-bit weights (supports {SUPPORTED_BITS})"
    if config.act_dtype not in (torch.float16, torch.bfloat16):
        return f"activations in {config.act_dtype} (needs float16 or bfloat16)"
    bk = (32 // config.bits) * PLANE_ROWS
    if config.in_features % bk:
        return f"in_features {config.in_features} is not a multiple of {bk} ({config.bits}-bit tile)"
    if config.group_size % PLANE_ROWS:
        return f"group_size {config.group_size} is not a multiple of {PLANE_ROWS}"
    return None


class DequantScratch:
    """One 16-bit scratch weight per (device, dtype), shared by every layer's prefill path.

    Layers announce their ``K * N`` at load (``reserve``); the first ``get`` allocates the largest
    announced size once, so a forward (eager or captured in a CUDA graph) dequantizes every layer
    into the same memory instead of one allocation per layer per call. Layers run one after
    another on one stream, which is what makes the sharing safe. A buffer replaced by a larger one
    is kept alive: a CUDA graph captured earlier may still point at it.
    """

    def __init__(self):
        self.need: dict[torch.device, int] = {}
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []

    def reserve(self, device: torch.device, numel: int) -> None:
        self.need[device] = max(self.need.get(device, 0), numel)

    def get(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self.buffers.get((device, dtype))
        size = max(numel, self.need.get(device, 0))
        if buf is None or buf.numel() < size:
            if buf is not None:
                self.retired.append(buf)
            buf = torch.empty(size, dtype=dtype, device=device)
            self.buffers[(device, dtype)] = buf
        return buf


SCRATCH = DequantScratch()


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # Triton's CPU interpreter (tests): pretend to be an H100/H200


class TritonW4A16Kernel(MPLinearKernel):
    """Marlin-class W4A16/W8A16 GEMM in Triton: group scales, zero points, act-order.

    Constraints: 4 or 8 bits, fp16/bf16 activations, ``in_features`` a multiple of 128 (4-bit) or
    64 (8-bit), ``group_size`` a multiple of 16 (per-channel counts as one group of K).
    """

    name = "triton_w4a16"

    @classmethod
    def can_implement(cls, config, device):
        why = triton_unavailable_reason(torch.device(device))
        return why or shape_unsupported_reason(config)

    def process_weights(self, layer: nn.Module, weights: WNA16Weights) -> None:
        from genserve_cuda.kernels.w4a16 import counters_needed, pack_wna16

        c = self.config
        K, N = c.in_features, c.out_features
        if tuple(weights.qweight.shape) != (K, N):
            raise ValueError(f"qweight is {tuple(weights.qweight.shape)}, expected ({K}, {N})")
        if tuple(weights.scales.shape) != (c.num_groups, N):
            raise ValueError(f"scales are {tuple(weights.scales.shape)}, expected ({c.num_groups}, {N})")
        device = weights.qweight.device
        zeros = weights.zeros.to(torch.uint8).contiguous() if weights.zeros is not None else None
        perm = weights.perm.to(device=device, dtype=torch.int64) if weights.perm is not None else None
        layer.register_buffer("w4a16_qweight", pack_wna16(weights.qweight, c.bits), persistent=False)
        layer.register_buffer("w4a16_scales", weights.scales.contiguous(), persistent=False)
        layer.register_buffer("w4a16_zeros", zeros, persistent=False)
        layer.register_buffer("w4a16_perm", perm, persistent=False)
        counters = torch.zeros(counters_needed(N, K, c.bits, _num_sms(device)), dtype=torch.int32, device=device)
        layer.register_buffer("w4a16_counters", counters, persistent=False)
        SCRATCH.reserve(device, K * N)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        from genserve_cuda.kernels.w4a16 import DOT_MAX_M, select_config, wna16_dequantize, wna16_gemm

        c = self.config
        x2 = x.reshape(-1, c.in_features)
        if layer.w4a16_perm is not None:
            x2 = x2.index_select(1, layer.w4a16_perm)
        elif x2.stride(1) != 1:
            x2 = x2.contiguous()
        m = x2.shape[0]
        if m > DOT_MAX_M:
            # prefill: one pass to a 16-bit scratch weight, then cuBLAS at full tensor-core rate
            scratch = SCRATCH.get(x2.device, x2.dtype, c.in_features * c.out_features)
            w = wna16_dequantize(layer.w4a16_qweight, layer.w4a16_scales, layer.w4a16_zeros,
                                 c.bits, c.group_size, x2.dtype, out=scratch)
            y = torch.addmm(bias, x2, w) if bias is not None else torch.mm(x2, w)
        else:
            cfg = select_config(max(m, 1), c.out_features, c.in_features, c.bits, _num_sms(x2.device))
            y = wna16_gemm(x2, layer.w4a16_qweight, layer.w4a16_scales, layer.w4a16_zeros, bias,
                           layer.w4a16_counters, c.bits, c.group_size, cfg)
        return y.view(*x.shape[:-1], c.out_features)
