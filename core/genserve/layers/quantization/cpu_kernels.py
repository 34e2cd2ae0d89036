"""Fast CPU mixed-precision kernels: torch's own packed low-bit matmuls.

* ``cpu_int4pack``: ``aten._weight_int4pack_mm_for_cpu`` over weights packed once by
  ``aten._convert_weight_to_int4pack_for_cpu`` (the ops torchao's int4 CPU layout uses). The op
  dequantizes ``w = (q - 8) * scale + zero`` with a float ``zero`` per group, so the canonical
  ``(q - z) * s`` becomes ``zero = (8 - z) * s``. Constraints (what the op checks): 4 bits,
  ``N % 16 == 0``, even ``K``, ``K % group_size == 0``, group size a multiple of 32 (16 for
  per-channel layers whose K is); act-order layers gather the activations' columns
  (``x[:, perm]``) before the op. Float group offsets (GGUF ``Q4_1``/``Q4_K`` minimums) add
  to ``zero``. 8-bit grouped weights (GGUF ``Q8_0``, grouped GPTQ 8-bit) run through the same op
  exactly, split into two 4-bit halves: ``q = 16 * hi + lo`` gives, per group of ``g``, a ``hi``
  group (scale ``16 s``, zero ``0``) and a ``lo`` group (scale ``s``, zero ``(136 - z) * s + o``)
  over the activations' group repeated twice (``K' = 2K``). 8-bit groups of 16 (GGUF ``Q6_K``)
  pad each half to the op's smallest group, 32, with zero activations (``K' = 4K``, as many
  bytes as bf16). The op is fast only with bf16
  activations (measured on this 2-core AMD EPYC, 1536x576 at M=1: 27 us in bf16, 766 us in fp32,
  1217 us in fp16, against 69 us for the dense fp32 matmul), so it runs in
  ``WNA16Config.compute_dtype`` when a format sets one (GGUF: bf16).
* ``cpu_int8pack``: ``aten._weight_int8pack_mm`` for 8-bit per-channel weights (``y = x @ (q8 *
  s).T``); asymmetric zero points fold into a rank-one correction
  ``y -= rowsum(x) * (z - 128) * s``.

Both run the activations' dtype (fp32, bf16, fp16). Measured in bench/cpu_wna16.py.
"""

from __future__ import annotations

import torch

from genserve.layers.quantization.kernels import MPLinearKernel

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(config) -> torch.dtype:
    return config.compute_dtype or config.act_dtype


def _rows(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return rows if perm is None else rows.index_select(1, perm)


class CpuInt4PackKernel(MPLinearKernel):
    name = "cpu_int4pack"

    @classmethod
    def can_implement(cls, config, device):
        if torch.device(device).type != "cpu":
            return "CPU only"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return "this torch has no _weight_int4pack_mm_for_cpu"
        k, n, g = config.in_features, config.out_features, config.group_size
        if config.bits not in (4, 8):
            return f"{config.bits}-bit weights (4, or 8 in groups)"
        if config.bits == 8 and (g == k or (g % 32 and g != 16)):
            return "8-bit per-channel weights (cpu_int8pack's) or groups neither 16 nor a multiple of 32"
        if config.act_dtype not in _ACT_DTYPES or _compute_dtype(config) not in _ACT_DTYPES:
            return f"activations in {config.act_dtype}"
        if n % 16 or k % 2:
            return f"{k}x{n} weight (needs N % 16 == 0 and an even K)"
        if k % g or g % 16 or (g % 32 and g != k and not (config.bits == 8 and g == 16)):
            return f"group size {g} for K={k} (needs a multiple of 32 dividing K)"
        return None

    supports_offsets = True

    def process_weights(self, layer, weights):
        c = self.config
        s = weights.scales.float()                                          # [G, N]
        z = weights.zero_points(c.bits).float()
        offset = 0.0 if weights.offsets is None else weights.offsets.float()
        if c.bits == 4:
            q = weights.qweight.t().to(torch.int32).contiguous()           # [N, K]
            scale, zero = s, (8.0 - z) * s + offset
        else:  # two 4-bit groups per 8-bit group: [hi nibbles, lo nibbles] (module docstring)
            n, g = c.out_features, c.group_size
            q8 = weights.qweight.t().to(torch.int32).reshape(n, -1, 1, g)  # [N, G, 1, g]
            q = torch.cat([q8 >> 4, q8 & 15], dim=2)                        # [N, G, 2, g]
            if g == 16:  # the op's smallest group is 32: pad each half (its activations are 0)
                q = torch.nn.functional.pad(q, (0, 16), value=8)
            q = q.reshape(n, -1).contiguous()                               # [N, 2K] (4K for g=16)
            scale = torch.stack([16 * s, s], dim=1).flatten(0, 1)           # [2G, N]
            zero = torch.stack([torch.zeros_like(s), (136.0 - z) * s + offset], dim=1).flatten(0, 1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        layer.register_buffer("int4_weight", packed, persistent=False)
        layer.register_buffer("int4_scales_zeros",
                              torch.stack([scale, zero], -1).to(_compute_dtype(c)).contiguous(), persistent=False)
        layer.register_buffer("int4_perm", weights.perm, persistent=False)

    def apply(self, layer, x, bias):
        c = self.config
        rows = _rows(x, layer.int4_perm).to(_compute_dtype(c))
        group = c.group_size
        if c.bits == 8:  # each activation group twice, against the hi and lo halves
            m, g = rows.shape[0], c.group_size
            rows = rows.reshape(m, -1, 1, g).expand(m, -1, 2, g)
            if g == 16:  # zeros against the padding of each half
                rows, group = torch.nn.functional.pad(rows, (0, 16)), 32
            rows = rows.reshape(m, -1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, layer.int4_weight, group,
                                                      layer.int4_scales_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias


class CpuInt8PackKernel(MPLinearKernel):
    name = "cpu_int8pack"

    @classmethod
    def can_implement(cls, config, device):
        if torch.device(device).type != "cpu":
            return "CPU only"
        if config.bits != 8:
            return f"{config.bits}-bit weights (8 only)"
        if config.group_size != config.in_features:
            return "grouped weights (per-channel only)"
        if config.act_dtype not in _ACT_DTYPES:
            return f"activations in {config.act_dtype}"
        return None

    def process_weights(self, layer, weights):
        c = self.config
        q8 = (weights.qweight.to(torch.int16) - 128).to(torch.int8).t().contiguous()   # [N, K]
        s = weights.scales.float()[0]                                                   # [N]
        layer.register_buffer("int8_weight", q8, persistent=False)
        layer.register_buffer("int8_scales", s.to(c.act_dtype), persistent=False)
        shift = None
        if weights.zeros is not None:
            shift = ((weights.zeros[0].float() - 128.0) * s).to(c.act_dtype)
        layer.register_buffer("int8_zero_shift", shift, persistent=False)
        layer.register_buffer("int8_perm", weights.perm, persistent=False)

    def apply(self, layer, x, bias):
        c = self.config
        rows = _rows(x, layer.int8_perm).to(c.act_dtype)
        y = torch.ops.aten._weight_int8pack_mm(rows, layer.int8_weight, layer.int8_scales)
        if layer.int8_zero_shift is not None:
            y = y - rows.sum(-1, keepdim=True) * layer.int8_zero_shift
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias
