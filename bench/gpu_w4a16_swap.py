"""Exploration: W4A16 with the operands swapped (``y^T = W_deq @ x^T``), on the device.

    python bench/gpu_w4a16_swap.py [--ms 1,16,64,128] [--ir]

Why: in ``genserve_cuda/kernels/w4a16.py`` the dequantized weight plane is the MMA's B operand.
On Hopper, wgmma takes B only from shared memory, so every dequantized plane is written to shared
memory and fenced before the MMA reads it. wgmma can take its A operand from registers: with the
product transposed (Machete's and Marlin-on-Hopper's "swap AB" for small M) the dequantized
weights are A (``[BLOCK_N, K]``, in registers) and the activations are B (``[K, BLOCK_M]``, a small
tile that Triton stages through shared memory by itself). Variants:

- ``plane``: one K = 16 dot per plane, dequantized by the same inline PTX as the kernel in use;
- ``block``: the block's 8 planes unpacked by a broadcast shift and reshaped to one ``[BN, 128]``
  operand, one K = 128 dot per block; ``post`` also moves the scale out of the dequantization
  (``s * (x . q - 8 * sum(x))`` per block: the operand is the exact small integer ``q``);
- ``gather`` (not swapped, ``_gather_kernel``): each of the block's 128 rows loads its word
  directly (8 rows share a word: the repeated addresses are L1 hits), shifts it by its own
  plane's amount, and one K = 128 ``tl.dot(x[BM, 128], w[128, BN])`` per block follows, with
  no reshape and no per-plane dot.

Prints, per Llama-3-8B layer shape and M, microseconds per GEMM (weights rotated past the L2, one
CUDA graph) of the kernel in use and each variant, and with ``--ir`` which MMA each variant
compiled to (``warp_group_dot`` = wgmma, ``mma`` = the sm_80 instruction) and how many shared
memory allocations / layout conversions its TTGIR has. Symmetric 4-bit, group 128 only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.join(ROOT, "core"),
                os.path.join(ROOT, "backends", "cuda")]

from genserve_cuda.kernels.w4a16 import _dequant4_asm, _store_tile  # noqa: E402


@triton.jit(do_not_specialize=["M", "split_k"])
def _swap_kernel(x_ptr, qw_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym, split_k,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NP: tl.constexpr, MODE: tl.constexpr,
                 POST: tl.constexpr, ASM: tl.constexpr, SPLIT: tl.constexpr):
    R: tl.constexpr = 16
    BK: tl.constexpr = 128
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R)
    n_mask = offs_n < N
    m_mask = offs_m < M
    KW = K // 8
    w_rows = qw_ptr + ((offs_n // NP).to(tl.int64) * KW * NP + offs_n % NP)[:, None]   # [BN, 1]
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm                         # [1, BM]
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    blocks = K // BK
    per = tl.cdiv(blocks, split_k)
    lo = pid_k * per
    hi = tl.minimum(lo + per, blocks)
    for blk in range(lo, hi):
        k0 = blk * BK
        words = tl.load(w_rows + (blk * R + offs_r)[None, :] * NP, mask=n_mask[:, None], other=0,
                        eviction_policy="evict_first")                                    # [BN, R]
        if MODE == 0:
            s = tl.load(s_ptr + blk * N + offs_n[:, None] + 0 * offs_r[None, :], mask=n_mask[:, None],
                        other=0.0).to(tl.float32)                                         # [BN, R]
            if ASM:
                planes = _dequant4_asm(words, (-(s * 0 + 136.0)).to(dt), s.to(dt), True)
            for j in tl.static_range(8):
                if ASM:
                    w = planes[j]
                else:
                    f = ((words >> (j * 4)) & 15) | 0x4B000000
                    w = ((f.to(tl.float32, bitcast=True) - 8388616.0) * s).to(dt)
                xt = tl.load(x_cols + (k0 + j * R + offs_r)[:, None], mask=m_mask[None, :], other=0.0)
                acc = tl.dot(w, xt, acc)
        else:
            shifts = tl.arange(0, 8) * 4
            q = (words[:, None, :] >> shifts[None, :, None]) & 15                         # [BN, 8, R]
            q = tl.reshape(q, [BLOCK_N, BK])
            xt = tl.load(x_cols + (k0 + tl.arange(0, BK))[:, None], mask=m_mask[None, :], other=0.0)  # [BK, BM]
            s = tl.load(s_ptr + blk * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]  # [BN, 1]
            qf = (q | 0x4B000000).to(tl.float32, bitcast=True)
            if POST:
                part = tl.dot((qf - 8388608.0).to(dt), xt)                                # x . q
                sx = tl.sum(xt.to(tl.float32), axis=0)[None, :]                          # [1, BM]
                acc += s * (part - 8.0 * sx)
            else:
                acc = tl.dot(((qf - 8388616.0) * s).to(dt), xt, acc)
    _store_tile(tl.trans(acc), s_ptr, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, split_k,
                pid_m, pid_n, pid_k, False, SPLIT, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M", "split_k"])
def _gather_kernel(x_ptr, qw_ptr, s_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, stride_xm, stride_ym, split_k,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NP: tl.constexpr, SPLIT: tl.constexpr):
    BK: tl.constexpr = 128
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BK)
    n_mask = offs_n < N
    m_mask = offs_m < M
    KW = K // 8
    w_cols = qw_ptr + ((offs_n // NP).to(tl.int64) * KW * NP + offs_n % NP)[None, :]   # [1, BN]
    word_row = (offs_k % 16)[:, None]                                                 # [BK, 1]
    shift = ((offs_k // 16) * 4)[:, None]
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    blocks = K // BK
    per = tl.cdiv(blocks, split_k)
    lo = pid_k * per
    hi = tl.minimum(lo + per, blocks)
    for blk in range(lo, hi):
        words = tl.load(w_cols + (blk * 16 + word_row) * NP, mask=n_mask[None, :], other=0)   # [BK, BN]
        s = tl.load(s_ptr + blk * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        f = ((words >> shift) & 15) | 0x4B000000
        w = ((f.to(tl.float32, bitcast=True) - 8388616.0) * s).to(dt)
        xk = tl.load(x_rows + (blk * BK + offs_k)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, BK]
        acc = tl.dot(xk, w, acc)
    _store_tile(acc, s_ptr, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, split_k,
                pid_m, pid_n, pid_k, False, SPLIT, BLOCK_M, BLOCK_N)


class Variant:
    def __init__(self, name, mode, post, asm, bm, bn, warps, stages, waves):
        self.name, self.mode, self.post, self.asm = name, mode, post, asm
        self.bm, self.bn, self.warps, self.stages, self.waves = bm, bn, warps, stages, waves

    def __str__(self):
        return f"{self.name} {self.bm}x{self.bn} w{self.warps} s{self.stages} waves{self.waves}"

    def split(self, m, n, k, sms):
        tiles = triton.cdiv(m, self.bm) * triton.cdiv(n, self.bn)
        blocks = k // 128
        split = max(1, min(16, blocks, triton.cdiv(self.waves * sms, tiles)))
        return triton.cdiv(blocks, triton.cdiv(blocks, split))

    def __call__(self, x, qweight, scales, counters, sms, out=None, compile_only=False):
        M, K = x.shape
        N = scales.shape[1]
        y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
        split = self.split(M, N, K, sms)
        grid = (triton.cdiv(M, self.bm), triton.cdiv(N, self.bn), split)
        ws = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else y
        if self.mode == 2:
            return _gather_kernel[grid](x, qweight, scales, y, ws, counters, M, N, K, x.stride(0), y.stride(0),
                                        split, BLOCK_M=self.bm, BLOCK_N=self.bn, NP=64, SPLIT=split > 1,
                                        num_warps=self.warps, num_stages=self.stages), y
        return _swap_kernel[grid](x, qweight, scales, y, ws, counters, M, N, K, x.stride(0), y.stride(0), split,
                                  BLOCK_M=self.bm, BLOCK_N=self.bn, NP=64, MODE=self.mode, POST=self.post,
                                  ASM=self.asm, SPLIT=split > 1, num_warps=self.warps, num_stages=self.stages), y


def variants_for(m: int, only: str | None = None) -> list[Variant]:
    bm = max(16, min(128, triton.next_power_of_2(m)))
    if only == "gather":
        out = []
        for bm_ in sorted({bm, max(16, bm // 2), max(16, bm // 4)}):
            for bn in (64, 128):
                for warps, stages in ((4, 3), (8, 3), (4, 4)):
                    out.append(Variant("gather", 2, False, False, bm_, bn, warps, stages, 4))
        return out
    out = []
    for bn in (64, 128, 256) if m <= 16 else (64, 128):
        for waves in (2, 4):
            out.append(Variant("plane-asm", 0, False, True, bm, bn, 4, 3, waves))
            out.append(Variant("block", 1, False, False, bm, bn, 4, 3, waves))
            out.append(Variant("block-post", 1, True, False, bm, bn, 4, 3, waves))
    out.append(Variant("plane-asm", 0, False, True, bm, 128, 8, 4, 4))
    out.append(Variant("block-post", 1, True, False, bm, 128, 8, 4, 4))
    if m >= 64:
        out.append(Variant("block-post", 1, True, False, bm // 2, 128, 4, 3, 4))
        out.append(Variant("plane-asm", 0, False, True, bm // 2, 128, 4, 3, 4))
    return out


def ir_summary(compiled) -> str:
    ttgir = compiled.asm.get("ttgir", "")
    return (f"wgmma={ttgir.count('warp_group_dot')} mma_v2={ttgir.count('tt.dot ')} "
            f"local_alloc={ttgir.count('local_alloc')} convert_layout={ttgir.count('convert_layout')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16,64,128")
    ap.add_argument("--ir", action="store_true")
    ap.add_argument("--only", default=None, choices=["gather"], help="time only these variants")
    args = ap.parse_args()
    from gpu_w4a16 import SHAPES, Shape, time_per_call
    from genserve_cuda.kernels.w4a16 import select_config, wna16_gemm

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}", flush=True)
    ms = [int(v) for v in args.ms.split(",")]
    totals: dict[tuple[int, str], float] = {}
    for name, (n, k) in SHAPES.items():
        sh = Shape(n, k)
        counters = torch.zeros(4096, dtype=torch.int32, device="cuda")
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ sh.dense.float().t()
            cfg = select_config(m, n, k, 4, sms)

            def cur(sh=sh, x=x, cfg=cfg):
                for lay in sh.layers:
                    wna16_gemm(x, lay.w4a16_qweight, lay.w4a16_scales, None, None, lay.w4a16_counters, 4, 128, cfg)
            t_cur = time_per_call(cur, len(sh.layers), m) * 1e3
            totals[(m, "current")] = totals.get((m, "current"), 0.0) + t_cur
            print(f"{name:8s} M={m:4d} current {t_cur:8.2f} us  ({cfg})", flush=True)
            best = None
            for v in variants_for(m, args.only):
                try:
                    compiled, y = v(x, sh.layers[0].w4a16_qweight, sh.layers[0].w4a16_scales, counters, sms)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    if not err < 1e-2:
                        print(f"    {v}: WRONG rel err {err:.2e}", flush=True)
                        continue

                    def run(v=v, sh=sh, x=x):
                        for lay in sh.layers:
                            v(x, lay.w4a16_qweight, lay.w4a16_scales, counters, sms)
                    t = time_per_call(run, len(sh.layers), m) * 1e3
                except Exception as e:  # a variant that does not compile is reported, not fatal
                    print(f"    {v}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                    continue
                ir = f"  [{ir_summary(compiled)}]" if args.ir else ""
                print(f"    {v}: {t:8.2f} us  x{t_cur / t:5.2f} vs current  err {err:.1e}{ir}", flush=True)
                key = (m, str(v))
                totals[key] = totals.get(key, 0.0) + t
                if best is None or t < best[0]:
                    best = (t, str(v))
            if best:
                print(f"  best M={m}: {best[1]} {best[0]:.2f} us vs current {t_cur:.2f}", flush=True)
        sh = None
        torch.cuda.empty_cache()
    print("\nper layer (4 GEMMs), us:")
    for m in ms:
        rows = sorted((t, v) for (mm, v), t in totals.items() if mm == m)
        for t, v in rows[:6]:
            print(f"  M={m:4d} {t:8.2f}  {v}")


if __name__ == "__main__":
    main()
