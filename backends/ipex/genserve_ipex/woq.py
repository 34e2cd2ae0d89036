"""``ipex_woq``: IPEX's weight-only-quantized (WOQ) int4/int8 CPU linear kernel.

An ``MPLinearKernel`` (``genserve.layers.quantization.kernels``): every integer weight format
genserve reads (GGUF ``Q4_0``/``Q4_1``/``Q8_0`` with ``--quantize gguf``, GPTQ, AWQ,
compressed-tensors ``pack-quantized``) hands it the canonical ``WNA16Weights``, and it packs them
once with IPEX's documented constructor
``intel_extension_for_pytorch.nn.modules.WeightOnlyQuantizedLinear.from_float_and_qweight``
in IPEX's *plain* format, then runs ``torch.ops.torch_ipex.ipex_woq_linear`` (IPEX's own
oneDNN/TPP micro-kernels) on every call.

Mapping from the canonical form ``W[n, k] = (q[k, n] - z) * s + o`` (per group) to IPEX's plain
format ``W = (q' - zp) * s``, row-major ``[out_features, in_features]``:

- 4 bits: ``q' = q.T`` packed two per byte, low nibble first (what IPEX's ``quantize_per_block``
  writes), ``zp = z - o / s`` as float (IPEX keeps float zero points, so a GGUF float minimum
  folds in exactly up to fp32 rounding).
- 8 bits: ``q' = q.T - 128`` as int8, ``zp = z - 128 - o / s``.

A group whose scale is 0 and offset is not (a GGUF block of equal weights) cannot carry its
offset as ``o / s``: it gets the scale ``|o| * 2**-100`` and the zero point ``-o / s = -+2**100``,
so ``(q - zp) * s`` rounds to ``o`` (``q`` is below float32's resolution at ``2**100``).

``lowp_mode``: the matmul runs in the layer's ``WNA16Config.compute_dtype`` when the format sets
one (GGUF: bf16, as the core's ``cpu_int4pack``), else in the activations' dtype (exact against
the dequantized reference in fp32). IPEX's ``lowp_mode=INT8`` (activations quantized to int8 at
run time, as llama.cpp does) is not used: it changes results beyond the format's own rounding.

Act-order layers (``perm``) gather the activations' columns before the op, as the core kernels do.

Speed: on this project's 2-core AMD EPYC (AVX512-BF16, no AMX), shared with other jobs, one
row through a SmolLM2 layer (1536x576, int4, groups of 32) took 0.8-20 ms here against 0.04 ms
for torch's ``cpu_int4pack`` and 0.07 ms for the dense fp32 matmul (best of repeated runs; IPEX's
own ``WeightOnlyQuantizedLinear.from_float`` recipes measured the same). So ``IpexBackend``
prefers the core's torch kernels and gives this one the layers they decline.
"""

from __future__ import annotations

import torch
from torch import nn

from genserve.layers.quantization.kernels import MPLinearKernel
from genserve_ipex.vendor import import_ipex, ipex_installed

_ACT_DTYPES = (torch.float32, torch.bfloat16)
_TINY = torch.finfo(torch.float32).tiny


def ipex_woq_modules():
    """(WeightOnlyQuantizedLinear, WoqWeightDtype, WoqLowpMode, get_weight_only_quant_qconfig_mapping)
    from IPEX (imports it on first use; MissingVendorLibrary when it is not installed)."""
    import_ipex()
    from intel_extension_for_pytorch.nn.modules import WeightOnlyQuantizedLinear
    from intel_extension_for_pytorch.quantization import (
        WoqLowpMode,
        WoqWeightDtype,
        get_weight_only_quant_qconfig_mapping,
    )
    return WeightOnlyQuantizedLinear, WoqWeightDtype, WoqLowpMode, get_weight_only_quant_qconfig_mapping


def plain_format(weights, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPEX's plain WOQ tensors from canonical ``WNA16Weights`` (module docstring).

    Returns ``(qweight, scales [N, G] float32, zero_points [N, G] float32)`` with ``qweight``
    uint8 ``[N, ceil(K / 2)]`` (4 bits, low nibble = even column) or int8 ``[N, K]`` (8 bits).
    """
    s = weights.scales.float().t()                                  # [N, G]
    z = weights.zero_points(bits).float().t()
    o = None if weights.offsets is None else weights.offsets.float().t()
    zp = z
    if o is not None:
        dead = s == 0  # every weight of the group equals its offset (module docstring)
        s = torch.where(dead, (o.abs() * 2.0 ** -100).clamp(min=_TINY), s)
        zp = torch.where(dead, -o / s, z - o / s)
    q = weights.qweight.t().contiguous()                            # [N, K] uint8 in [0, 2**bits)
    if bits == 4:
        if q.shape[1] % 2:
            q = torch.nn.functional.pad(q, (0, 1))
        q = q[:, 1::2].bitwise_left_shift(4).bitwise_or_(q[:, ::2]).contiguous()
    else:
        q = (q.to(torch.int16) - 128).to(torch.int8).contiguous()
        zp = zp - 128.0
    return q, s.contiguous(), zp.contiguous()


class IpexWoqKernel(MPLinearKernel):
    """IPEX's WOQ linear for 4-bit and 8-bit weights, per channel or in groups, on the CPU."""

    name = "ipex_woq"
    supports_offsets = True  # folded into IPEX's float zero points

    @classmethod
    def can_implement(cls, config, device):
        if torch.device(device).type != "cpu":
            return "CPU only (IPEX's XPU WOQ kernels are not wired)"
        if not ipex_installed():
            return "intel_extension_for_pytorch is not installed"
        if config.bits not in (4, 8):
            return f"{config.bits}-bit weights (4 or 8)"
        compute = config.compute_dtype or config.act_dtype
        if config.act_dtype not in _ACT_DTYPES or compute not in _ACT_DTYPES:
            return f"activations in {config.act_dtype} (float32 or bfloat16)"
        if config.group_size != config.in_features and config.in_features % config.group_size:
            return f"group size {config.group_size} does not divide K={config.in_features}"
        return None

    def process_weights(self, layer: nn.Module, weights) -> None:
        c = self.config
        woq_linear, woq_dtype, lowp, qconfig_mapping = ipex_woq_modules()
        dtype = woq_dtype.INT4 if c.bits == 4 else woq_dtype.INT8
        mode = lowp.BF16 if (c.compute_dtype or c.act_dtype) == torch.bfloat16 else lowp.NONE
        per_channel = c.group_size == c.in_features
        group = -1 if per_channel else c.group_size
        q, s, zp = plain_format(weights, c.bits, c.group_size)
        # from_float_and_qweight reads shapes and the recipe from a float Linear (on the meta
        # device: no memory) whose `qconfig` is IPEX's WOQ recipe.
        shell = nn.Linear(c.in_features, c.out_features, bias=False, device="meta")
        shell.qconfig = qconfig_mapping(weight_dtype=dtype, lowp_mode=mode, group_size=group).global_qconfig
        packed = woq_linear.from_float_and_qweight(shell, q, dtype, s, zp, None, group)
        layer.ipex_woq_linear = packed  # a submodule: IPEX's packed weight and its op context
        layer.register_buffer("ipex_woq_perm", weights.perm, persistent=False)

    def apply(self, layer, x, bias):
        c = self.config
        rows = x.reshape(-1, x.shape[-1])
        if layer.ipex_woq_perm is not None:
            rows = rows.index_select(1, layer.ipex_woq_perm)
        y = layer.ipex_woq_linear(rows.to(c.compute_dtype or c.act_dtype))
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
