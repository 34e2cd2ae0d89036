"""Pure-torch quantizers and checkpoint packers for the tests, written from each format's reference
packing code (AutoGPTQ/GPTQModel ``pack``, AutoAWQ ``pack``, compressed-tensors ``pack_to_int32``,
Marlin ``Layer.pack``), independent of genserve's unpackers."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Quantized:
    """Integer weights of a dense ``[N, K]`` matrix: ``W[n, k] = (q[k, n] - z[g[k], n]) * s[g[k], n]``."""

    q: torch.Tensor        # int64 [K, N] in [0, 2**bits)
    scales: torch.Tensor   # float32 [G, N]
    zeros: torch.Tensor    # int64 [G, N]
    g_idx: torch.Tensor    # int64 [K]
    bits: int
    group_size: int        # -1: per channel

    def dequantized(self) -> torch.Tensor:
        """The dense ``[N, K]`` weight these integers stand for."""
        w = (self.q - self.zeros[self.g_idx]).float() * self.scales[self.g_idx]
        return w.t().contiguous()


def quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, act_order: bool = False,
             seed: int = 0) -> Quantized:
    """Round-to-nearest min/max quantization of ``w [N, K]`` (GPTQ's quantizer without the
    error feedback). Act-order: input features go to groups in a random order (as GPTQ's
    ``desc_act`` does, ordered by the Hessian diagonal)."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    if act_order:
        order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[order] = torch.arange(k) // gs
    else:
        g_idx = torch.arange(k) // gs
    maxq = 2 ** bits - 1
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    for g in range(groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
        if sym:
            amax = torch.maximum(lo.abs(), hi).clamp(min=1e-8)
            scales[g] = 2 * amax / maxq
            zeros[g] = (maxq + 1) // 2
        else:
            scales[g] = ((hi - lo) / maxq).clamp(min=1e-8)
            zeros[g] = torch.round(-lo / scales[g]).long().clamp(0, maxq)
    scales = scales.half().float()  # checkpoints store fp16 scales
    q = torch.round(w.t() / scales[g_idx] + zeros[g_idx]).long().clamp(0, maxq)
    return Quantized(q, scales, zeros, g_idx, bits, group_size)


def _words(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dim's consecutive runs of ``32 // bits`` values into int32, value ``j`` of a
    run at bits ``[j*bits, (j+1)*bits)`` (the loop ``q |= v[:, j::pf] << bits*j``)."""
    pf = 32 // bits
    v = values.long()
    out = torch.zeros(*v.shape[:-1], v.shape[-1] // pf, dtype=torch.int64)
    for j in range(pf):
        out |= v[..., j::pf] << (bits * j)
    return (out - (out >= 2**31).long() * 2**32).to(torch.int32)


def gptq_tensors(qz: Quantized, v1: bool) -> dict[str, torch.Tensor]:
    """``qweight [K/pf, N]``, ``qzeros [G, N/pf]`` (v1: zero points minus one), ``scales``, ``g_idx``."""
    zeros = qz.zeros - 1 if v1 else qz.zeros
    return {"qweight": _words(qz.q.t(), qz.bits).t().contiguous(),
            "qzeros": _words(zeros & (2 ** qz.bits - 1), qz.bits),
            "scales": qz.scales.half(), "g_idx": qz.g_idx.int()}


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_tensors(qz: Quantized) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM: nibble ``i`` of word ``c`` holds column ``8c + ORDER[i]``."""
    def pack(v):
        cols = v.reshape(v.shape[0], -1, 8)[..., AWQ_ORDER].reshape(v.shape)
        return _words(cols, 4)
    return {"qweight": pack(qz.q), "qzeros": pack(qz.zeros), "scales": qz.scales.half()}


def ct_tensors(qz: Quantized, sym: bool, act_order: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized: signed values + offset, packed along the last dim."""
    bits, (k, n) = qz.bits, qz.q.shape
    pf = 32 // bits
    qt = qz.q.t()
    pad = -k % pf
    if pad:
        qt = torch.nn.functional.pad(qt, (0, pad))
    out = {"weight_packed": _words(qt, bits), "weight_scale": qz.scales.t().contiguous().half(),
           "weight_shape": torch.tensor([n, k])}
    if not sym:
        # [N, G] zero points (signed + offset), packed along N: [N / pf, G].
        out["weight_zero_point"] = _words(qz.zeros.contiguous(), bits).t().contiguous()
    if act_order:
        out["weight_g_idx"] = qz.g_idx.int()
    return out


def _marlin_perms():
    perm = []
    for i in range(32):
        perm1 = []
        col = i // 4
        for block in [0, 1]:
            for row in [2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1]:
                perm1.append(16 * row + col + 8 * block)
        for j in range(4):
            perm.extend([p + 256 * j for p in perm1])
    perm = torch.tensor(perm).reshape(-1, 8)[:, [0, 2, 4, 6, 1, 3, 5, 7]].reshape(-1)
    scale_perm = []
    for i in range(8):
        scale_perm.extend([i + 8 * j for j in range(8)])
    single = []
    for i in range(4):
        single.extend([2 * i + j for j in [0, 1, 8, 9, 16, 17, 24, 25]])
    return perm, torch.tensor(scale_perm), torch.tensor(single)


def marlin_tensors(qz: Quantized) -> dict[str, torch.Tensor]:
    """Marlin ``Layer.pack`` (symmetric 4-bit, zero point 8): ``B`` and ``s``."""
    assert bool((qz.zeros == 8).all())
    perm, scale_perm, single = _marlin_perms()
    k, n = qz.q.shape
    w = qz.q.reshape(k // 16, 16, n // 16, 16).permute(0, 2, 1, 3).reshape(k // 16, n * 16)
    w = w.reshape(-1, perm.numel())[:, perm].reshape(w.shape)
    sp = scale_perm if qz.group_size != -1 else single
    s = qz.scales.reshape(-1, sp.numel())[:, sp].reshape(-1, n)
    return {"B": _words(w, 4), "s": s.half()}
