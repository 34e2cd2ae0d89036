"""Mixed-precision GEMM for 4- and 8-bit integer weights with 16-bit activations (W4A16 / W8A16).

``y[M, N] = x[M, K] @ dequant(W)[K, N] (+ bias)`` with the canonical dequantization rule of
``genserve.layers.quantization.kernels``: ``W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]``.

**Packed layout** (built once at load by ``pack_wna16``). ``PACK = 32 // bits`` values share one
int32 word, and the words are grouped in blocks of ``R = 16`` rows: word row ``b*R + r`` holds, in
its bit field ``j`` (bits ``j*bits ..``), input row ``k = b*BK + j*R + r`` with ``BK = PACK * R``
(128 rows for 4-bit, 64 for 8-bit). Shifting every word of an ``[R, BLOCK_N]`` tile by
``j*bits`` so yields a *contiguous* run of 16 input rows (a "plane") that meets the 16 contiguous
activation columns ``x[:, b*BK + j*R : +16]`` without any shuffle (the idea of Marlin's
interleaved layout, Frantar et al. 2024, reduced to what Triton can express). The words are
stored in 64-column strips, ``[ceil(N / 64), K // PACK, 64]``, so a program reading one strip
along K streams contiguous memory. Each plane lies inside one quantization group whenever
``group_size % 16 == 0``.

**Dequantization in registers.** No int-to-float conversion (a quarter of the FMA rate):
- tensor cores, 4-bit, groups of whole 128-row blocks (``_dequant4_asm``, inline PTX): Marlin's
  magic numbers. One LOP3 ORs a pair of 4-bit fields into the mantissas of a bf16x2 (fp16x2)
  register whose exponent encodes 128 (1024), giving ``E + q`` exactly; one FMA2 adds
  ``-(E + z)`` (exact), one FMA2 multiplies by the scale (one rounding). Eight planes from two
  words: 2 PRMT + 6 SHR + 8 LOP3 + 16 FMA2 for 16 weights, against about 36 instructions per
  word before. ``_dequant_plane`` is its pure-Triton twin (the interpreter, 8-bit weights and
  groups that change inside a block), computing the same values.
- GEMV: the field moved to the top of a float32 mantissa, ``0x3F800000 | q << (23 - bits)``, reads
  as ``1 + q / 2**bits``; one FMA per weight accumulates ``x * (1 + q / 2**bits)`` and the ``1``,
  the zero point and the scale come off once per block (``s * (2**bits * part - (2**bits + z) * sum(x))``).
- the twin and the scratch dequantization: ``0x4B000000 | q`` reads as ``2**23 + q``, so
  ``(q - z) * s`` is one subtraction and one multiply before the 16-bit operand is formed.

**Paths**, picked per call by the number of rows ``M`` from a fixed table (``select_config``):

- *Tensor cores* (``1 <= M <= DOT_MAX_M``): per plane, ``tl.dot(x[BM, 16], dequant[16, BN])``;
  one row (batch-1 decode) is padded to a 16-row tile, which with the PTX dequantization beats
  the CUDA-core GEMV. Split-K over the grid's third axis keeps every SM busy.
- *GEMV* (``use_dot=False``, one row): CUDA-core FMAs on an ``[R, BLOCK_N]`` tile, weights
  prefetched ``prefetch`` blocks ahead in registers. Kept for launches the table may choose
  again (no PTX dequantization: it needs fp32 weights for its FMAs).
- *Large M* (prefill): dequantize the whole weight into a 16-bit ``[K, N]`` scratch buffer with
  ``wna16_dequantize`` and let cuBLAS multiply; the extra pass moves ``2.5 * K * N`` bytes, small
  next to the matmul once ``M`` is in the thousands.

Split-K partial sums go to an fp32 workspace; the last program to finish a tile (an atomic
counter per tile) adds them up, writes the output and resets its counter to zero, so one
launch does the whole product and the counters are ready for the next call (CUDA-graph safe:
no host sync, no memset).

Measured on an H200 (``bench/gpu_w4a16.py``, backends/cuda/NOTES.md "W4A16"): 1.4-1.9x bf16
cuBLAS at M = 1 and 1.2-1.6x at M = 16, 0.7-0.87x at M = 64, 0.4-0.5x at M = 128 (the best of
tensor cores and dequant + cuBLAS is still slower than bf16 there), 0.94-0.96x at M = 4096. At
M = 1 the kernel reaches 20-42% of copy bandwidth. Cutting the dequantization instructions about
3x made it only ~1.4x faster, so the rest is most likely the per-plane ``tl.dot``: every 16-row
plane goes registers -> shared memory -> MMA operand (Triton's layout conversion) behind
barriers (not profiled). A variant with one ``tl.dot`` per 128-row block (the block's words
unpacked by a broadcast shift into ``[8, 16, BN]`` and reshaped to ``[128, BN]``) was no faster
at M = 128 (289 vs 290 us per layer) and 1.2-2x slower at M <= 16
(bench/results/h200-w4a16-sweep-2026-12-01.txt), so the per-plane form stays. At M = 128 the
kernel is ~2x slower than bf16 cuBLAS: closing that needs wgmma on a dequantized shared-memory
tile (Machete), which Triton 3.6 does not let us express. Swapping the operands (the dequantized
weights as wgmma's register A operand) and gathering each block's rows for one K = 128 dot were
measured too and did not help (backends/cuda/NOTES.md, "Session 6").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

ROWS_PER_BLOCK = 16  # R: words per block along K; a plane is R contiguous input rows
PACK_N = 64          # NP: output columns per contiguous column strip of the packed weight


def pack_factor(bits: int) -> int:
    return 32 // bits


def block_k(bits: int) -> int:
    """Input rows per packed block: 128 for 4-bit, 64 for 8-bit."""
    return pack_factor(bits) * ROWS_PER_BLOCK


def pack_wna16(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical ``qweight`` uint8 ``[K, N]`` -> int32 ``[ceil(N / 64), K // PACK, 64]``.

    Word ``[c, b*R + r, i]`` holds, in bit field ``j``, ``q[b*BK + j*R + r, c*64 + i]`` (zero for
    the padding columns past ``N``). Raises ValueError when ``K`` is not a multiple of
    ``block_k(bits)`` or a value is out of range.
    """
    K, N = qweight.shape
    pack, bk = pack_factor(bits), block_k(bits)
    if K % bk:
        raise ValueError(f"in_features {K} is not a multiple of {bk} ({bits}-bit packing)")
    q = qweight.to(torch.int64)
    if int(q.max()) >= 2 ** bits or int(q.min()) < 0:
        raise ValueError(f"qweight holds values outside [0, {2 ** bits})")
    q = q.view(K // bk, pack, ROWS_PER_BLOCK, N)           # [b, j, r, n]
    shifts = (torch.arange(pack, device=q.device, dtype=torch.int64) * bits).view(1, pack, 1, 1)
    words = (q << shifts).sum(dim=1).reshape(K // pack, N)  # [kw, n], < 2**32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    n_pad = -(-N // PACK_N) * PACK_N
    if n_pad != N:
        words = torch.nn.functional.pad(words, (0, n_pad - N))
    return words.view(K // pack, n_pad // PACK_N, PACK_N).permute(1, 0, 2).contiguous()


def unpack_wna16(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_wna16`` (for tests): -> uint8 ``[K, n]``."""
    pack = pack_factor(bits)
    chunks, kw, np_ = packed.shape
    words = packed.permute(1, 0, 2).reshape(kw, chunks * np_)[:, :n]
    w = words.to(torch.int64).view(kw // ROWS_PER_BLOCK, 1, ROWS_PER_BLOCK, n)
    shifts = (torch.arange(pack, device=w.device, dtype=torch.int64) * bits).view(1, pack, 1, 1)
    q = (w >> shifts) & (2 ** bits - 1)                     # [b, j, r, n]
    return q.reshape(kw * pack, n).to(torch.uint8)


@dataclass(frozen=True)
class GemmConfig:
    """One launch shape of ``_wna16_gemm_kernel`` (fixed per M bucket; no run-time tuning)."""

    use_dot: bool
    block_m: int
    block_n: int
    split_k: int
    num_warps: int
    num_stages: int
    prefetch: int = 2  # CUDA-core path: blocks loaded ahead in registers (1..3)


@triton.jit
def _load_scale_zero(s_ptr, z_ptr, g, N, offs_n, n_mask, BITS: tl.constexpr, HAS_ZP: tl.constexpr):
    """Scale and zero point (both fp32, shaped like ``offs_n``) of group ``g``.

    Called with ``[R, BN]`` offsets (every row the same): the loads then get the weight tile's
    register layout, where a ``[BN]`` load made Triton convert the whole accumulator through
    shared memory (two barriers) on every block. The repeated rows are L1 hits.
    """
    s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZP:
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
    else:
        z = tl.full(offs_n.shape, 1 << (BITS - 1), tl.float32)
    return s, z


# 4-bit -> 16-bit dequantization of two packed words by magic numbers (Marlin's trick, Frantar et
# al. 2024, "MARLIN: Mixed-Precision Auto-Regressive Parallel Inference", and its `dequant`):
# a 4-bit field q OR-ed into the low mantissa bits of a 16-bit float whose exponent encodes E
# (bf16 0x4300 = 128, fp16 0x6400 = 1024; both have >= 7 mantissa bits, so the value is exactly
# E + q) gives E + q with one LOP3 for a PAIR of values (a half2/bf16x2 register). One FMA2 adds
# -(E + z) (an exact small integer), one FMA2 multiplies by the scale (one rounding, the same as
# rounding the fp32 (q - z) * s). The pair is (word0 field j, word1 field j): PRMT first puts
# the low (high) 16 bits of both words into one register, then shifts by 4 walk the fields.
# (fma.bf16x2 takes no immediates: the constants go through registers.)
# $0..$7: plane j = 0..7 of both elements; $8, $9: the two words; $10: -(E + z) pair; $11: s pair.
_DEQ4_BODY = """
{
.reg .b32 lo, hi, t, one, nz;
mov.b32 one, ONE;
mov.b32 nz, NEGZERO;
prmt.b32 lo, $8, $9, 0x5410;
prmt.b32 hi, $8, $9, 0x7632;
lop3.b32 $0, lo, 0x000F000F, MAGIC, 0xEA;
shr.u32 t, lo, 4;
lop3.b32 $1, t, 0x000F000F, MAGIC, 0xEA;
shr.u32 t, lo, 8;
lop3.b32 $2, t, 0x000F000F, MAGIC, 0xEA;
shr.u32 t, lo, 12;
lop3.b32 $3, t, 0x000F000F, MAGIC, 0xEA;
lop3.b32 $4, hi, 0x000F000F, MAGIC, 0xEA;
shr.u32 t, hi, 4;
lop3.b32 $5, t, 0x000F000F, MAGIC, 0xEA;
shr.u32 t, hi, 8;
lop3.b32 $6, t, 0x000F000F, MAGIC, 0xEA;
shr.u32 t, hi, 12;
lop3.b32 $7, t, 0x000F000F, MAGIC, 0xEA;
""" + "".join(f"fma.rn.TY ${j}, ${j}, one, $10;\nfma.rn.TY ${j}, ${j}, $11, nz;\n" for j in range(8)) + "}"
_DEQ4_ASM_BF16: tl.constexpr = tl.constexpr(
    _DEQ4_BODY.replace("MAGIC", "0x43004300").replace("TY", "bf16x2").replace("ONE", "0x3F803F80")
    .replace("NEGZERO", "0x80008000"))
_DEQ4_ASM_F16: tl.constexpr = tl.constexpr(
    _DEQ4_BODY.replace("MAGIC", "0x64006400").replace("TY", "f16x2").replace("ONE", "0x3C003C00")
    .replace("NEGZERO", "0x80008000"))


def magic_bias(dtype: torch.dtype) -> float:
    """The E of ``E + q`` in the 4-bit magic-number dequantization for 16-bit ``dtype``."""
    return 128.0 if dtype == torch.bfloat16 else 1024.0


@triton.jit
def _dequant4_asm(words, nzb, s, IS_BF16: tl.constexpr):
    """``[R, BN]`` int32 words -> the 8 planes ``(q_j - z) * s`` in the activation dtype (a tuple).

    ``nzb = -(E + z)`` and ``s`` in the activation dtype, shaped like ``words``. GPU only (inline
    PTX, sm_80+); ``_dequant_plane`` is the pure-Triton twin (interpreter, 8-bit, per-plane groups).
    """
    if IS_BF16:
        return tl.inline_asm_elementwise(
            _DEQ4_ASM_BF16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, nzb, s],
            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(
            _DEQ4_ASM_F16, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r", [words, nzb, s],
            dtype=(tl.float16,) * 8, is_pure=True, pack=2)


@triton.jit
def _dequant_plane(words, j: tl.constexpr, z, s, BITS: tl.constexpr, dtype: tl.constexpr):
    """Plane ``j`` of ``[R, BN]`` words: ``(q_j - z) * s`` (fp32 ``z``, ``s``) rounded to ``dtype``.

    ``2**23 + q`` by one OR (no int-to-float conversion), one subtraction, one multiply: the same
    values as ``_dequant4_asm`` (both round the exact ``(q - z) * s`` once).
    """
    field = ((words >> (j * BITS)) & ((1 << BITS) - 1)) | 0x4B000000
    return ((field.to(tl.float32, bitcast=True) - (z + 8388608.0)) * s).to(dtype)


@triton.jit(do_not_specialize=["M", "split_k"])
def _wna16_gemm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, stride_xm, stride_ym, group_size, split_k,
    BITS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, SCALE_PER_PLANE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, NP: tl.constexpr,
    PREFETCH: tl.constexpr, ASM: tl.constexpr, IS_BF16: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    R: tl.constexpr = 16
    BK: tl.constexpr = PACK * R
    FIELD: tl.constexpr = (1 << BITS) - 1
    TOP: tl.constexpr = 23 - BITS                 # field at the top of a float32 mantissa
    TWO_B: tl.constexpr = 1 << BITS
    ONE_ROW: tl.constexpr = not USE_DOT  # the CUDA-core GEMV takes one row (BLOCK_M == 1)

    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    cols = offs_n[None, :]
    cmask = n_mask[None, :]
    tile_cols = cols + 0 * offs_r[:, None]            # [R, BN]: scale/zero loads in the tile layout
    tile_cmask = cmask & (offs_r[:, None] >= 0)

    num_blocks = K // BK
    per_split = tl.cdiv(num_blocks, split_k)
    blk_lo = pid_k * per_split
    blk_hi = tl.minimum(blk_lo + per_split, num_blocks)

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm          # [BM, 1]
    # word (kw, n) sits at ((n // NP) * KW + kw) * NP + n % NP: a program streams whole strips
    KW = K // PACK
    w_cols = qw_ptr + ((offs_n // NP).to(tl.int64) * KW * NP + offs_n % NP)[None, :]  # [1, BN]
    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([R, BLOCK_N], dtype=tl.float32)

    if not USE_DOT:
        # CUDA-core path: the compiler does not pipeline these loads, so keep PREFETCH blocks in
        # flight in registers (wa is the next block, wb and wc the ones after)
        wa = tl.load(w_cols + (blk_lo * R + offs_r)[:, None] * NP,
                     mask=cmask & (blk_lo < blk_hi), other=0, eviction_policy="evict_first")
        if PREFETCH >= 2:
            wb = tl.load(w_cols + ((blk_lo + 1) * R + offs_r)[:, None] * NP,
                         mask=cmask & (blk_lo + 1 < blk_hi), other=0, eviction_policy="evict_first")
        if PREFETCH >= 3:
            wc = tl.load(w_cols + ((blk_lo + 2) * R + offs_r)[:, None] * NP,
                         mask=cmask & (blk_lo + 2 < blk_hi), other=0, eviction_policy="evict_first")
    for blk in range(blk_lo, blk_hi):
        if USE_DOT:  # the tensor-core loop is software-pipelined by Triton (num_stages)
            words = tl.load(w_cols + (blk * R + offs_r)[:, None] * NP,
                            mask=cmask, other=0, eviction_policy="evict_first")  # [R, BN]
        else:
            words = wa
            ahead = blk + PREFETCH
            w_new = tl.load(w_cols + (ahead * R + offs_r)[:, None] * NP,
                            mask=cmask & (ahead < blk_hi), other=0, eviction_policy="evict_first")
            if PREFETCH == 1:
                wa = w_new
            elif PREFETCH == 2:
                wa = wb
                wb = w_new
            else:
                wa = wb
                wb = wc
                wc = w_new
        k0 = blk * BK
        if not SCALE_PER_PLANE:
            # the whole block lies in one group: scales and zeros once, after the planes
            s, z = _load_scale_zero(s_ptr, z_ptr, k0 // group_size, N, tile_cols, tile_cmask, BITS, HAS_ZP)
            if ONE_ROW:
                part = tl.zeros([R, BLOCK_N], dtype=tl.float32)
                xs = tl.zeros([R, 1], dtype=tl.float32)
        if ASM:  # 4-bit, whole block in one group, tensor cores: the 8 planes by inline PTX
            dt = x_ptr.dtype.element_ty
            if IS_BF16:
                nzb = (-(z + 128.0)).to(dt)
            else:
                nzb = (-(z + 1024.0)).to(dt)
            planes = _dequant4_asm(words, nzb, s.to(dt), IS_BF16)
        for j in tl.static_range(PACK):  # one 16-row plane per dot
            if SCALE_PER_PLANE:
                s, z = _load_scale_zero(s_ptr, z_ptr, (k0 + j * R) // group_size, N, tile_cols, tile_cmask,
                                        BITS, HAS_ZP)
            if ONE_ROW:
                xj = tl.load(x_ptr + k0 + j * R + offs_r).to(tl.float32)[:, None]       # [R, 1]
            else:
                xj = tl.load(x_rows + (k0 + j * R + offs_r)[None, :], mask=m_mask[:, None], other=0.0)
            if USE_DOT:
                if ASM:
                    w = planes[j]
                else:
                    w = _dequant_plane(words, j, z, s, BITS, x_ptr.dtype.element_ty)
                acc = tl.dot(xj, w, acc)
            elif SCALE_PER_PLANE:
                acc += xj * _dequant_plane(words, j, z, s, BITS, tl.float32)
            else:
                # 1 + q / 2**BITS: the field moved to the top of the mantissa (shift + one LOP3),
                # then one FMA per weight; the 1 and the zero point come off once per block.
                if TOP >= BITS * j:
                    t = words << (TOP - BITS * j)
                else:
                    t = words >> (BITS * j - TOP)
                qf = ((t & (FIELD << TOP)) | 0x3F800000).to(tl.float32, bitcast=True)
                part += xj * qf
                xs += xj
        if not SCALE_PER_PLANE:
            if ONE_ROW:
                acc += s * (part * TWO_B - (z + TWO_B) * xs)

    if USE_DOT:
        out = acc
    else:
        out = tl.sum(acc, axis=0)[None, :]                                  # [1, BN]
    _store_tile(out, bias_ptr, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, split_k,
                pid_m, pid_n, pid_k, HAS_BIAS, SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def _store_tile(out, bias_ptr, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, stride_ym, split_k,
                pid_m, pid_n, pid_k, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write an fp32 ``[BM, BN]`` tile: directly, or as a split-K partial that the last program
    of the tile sums (an atomic arrival counter per tile, reset to zero for the next launch)."""
    m_mask = offs_m < M
    n_mask = offs_n < N
    out_mask = m_mask[:, None] & n_mask[None, :]
    y_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if not SPLIT:
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        mn = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k.to(tl.int64) * M * N + mn, out, mask=out_mask)
        # every thread's partial is stored before one thread bumps the tile's counter (release)
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(1) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == split_k - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for p in range(0, split_k):
                total += tl.load(ws_ptr + p * M * N + mn, mask=out_mask, other=0.0,
                                 cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch


@triton.jit
def _wna16_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, group_size,
                          BITS: tl.constexpr, HAS_ZP: tl.constexpr, NP: tl.constexpr):
    """One program: one packed block of one 64-column strip -> its rows of ``w[K, N]``."""
    PACK: tl.constexpr = 32 // BITS
    R: tl.constexpr = 16
    BK: tl.constexpr = PACK * R
    FIELD: tl.constexpr = (1 << BITS) - 1
    blk = tl.program_id(0)
    strip = tl.program_id(1)
    offs_i = tl.arange(0, NP)
    offs_n = strip * NP + offs_i
    offs_r = tl.arange(0, R)
    n_mask = offs_n < N
    KW = K // PACK
    words = tl.load(qw_ptr + strip.to(tl.int64) * KW * NP + (blk * R + offs_r)[:, None] * NP + offs_i[None, :])
    for j in tl.static_range(PACK):
        k = blk * BK + j * R
        s, z = _load_scale_zero(s_ptr, z_ptr, k // group_size, N, offs_n[None, :] + 0 * offs_r[:, None],
                                n_mask[None, :] & (offs_r[:, None] >= 0), BITS, HAS_ZP)
        field = ((words >> (j * BITS)) & FIELD) | 0x4B000000
        w = (field.to(tl.float32, bitcast=True) - (z + 8388608.0)) * s
        tl.store(w_ptr + (k + offs_r).to(tl.int64)[:, None] * N + offs_n[None, :],
                 w.to(w_ptr.dtype.element_ty), mask=n_mask[None, :])


def ptx_available(x: torch.Tensor) -> bool:
    """Whether inline PTX can run where ``x`` lives: an NVIDIA GPU. ROCm's PyTorch also reports
    ``is_cuda``, but AMD GPUs take no PTX, so there the pure-Triton twin dequantizes."""
    return x.is_cuda and getattr(torch.version, "hip", None) is None


def wna16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
               zeros: torch.Tensor | None, bias: torch.Tensor | None, counters: torch.Tensor,
               bits: int, group_size: int, cfg: GemmConfig, out: torch.Tensor | None = None,
               asm: bool | None = None) -> torch.Tensor:
    """``x [M, K]`` (16-bit, row stride free, unit column stride) -> ``[M, N]`` in ``x``'s dtype.

    ``qweight`` int32 ``[ceil(N / 64), K // PACK, 64]`` from ``pack_wna16``; ``scales`` ``[G, N]``; ``zeros``
    uint8 ``[G, N]`` or None (symmetric); ``counters`` int32 zeros with at least one entry per
    output tile when ``cfg.split_k > 1`` (left zeroed again by the kernel). ``out`` (optional,
    ``[M, N]``, unit column stride) receives the result. ``asm`` picks the dequantization of
    the tensor-core path: inline PTX (``_dequant4_asm``) or the pure-Triton twin; None = PTX
    wherever it applies (CUDA, 4-bit, groups of whole blocks). Raises ValueError for a launch
    the kernel cannot run (``asm`` where it does not apply, a GEMV with ``block_m != 1``).
    """
    M, K = x.shape
    N = scales.shape[1]
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    if not cfg.use_dot and cfg.block_m != 1:
        raise ValueError("the CUDA-core GEMV takes one row per program (block_m=1)")
    per_plane = group_size % block_k(bits) != 0
    # the inline-PTX dequantization: NVIDIA GPU, 4-bit, one group per block, tensor cores
    can_asm = ptx_available(x) and bits == 4 and not per_plane and cfg.use_dot
    if asm is None:
        asm = can_asm
    elif asm and not can_asm:
        raise ValueError("the inline-PTX dequantization needs an NVIDIA GPU tensor, 4-bit weights, "
                         "tensor cores and groups of whole 128-row blocks")
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), cfg.split_k)
    if cfg.split_k > 1:
        assert counters.numel() >= grid[0] * grid[1], "split-K counters too small for this launch"
        ws = torch.empty(cfg.split_k, M, N, dtype=torch.float32, device=x.device)
    else:
        ws = y
    _wna16_gemm_kernel[grid](
        x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
        y, ws, counters, M, N, K, x.stride(0), y.stride(0), group_size, cfg.split_k,
        BITS=bits, HAS_ZP=zeros is not None, HAS_BIAS=bias is not None,
        USE_DOT=cfg.use_dot, SCALE_PER_PLANE=per_plane,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT=cfg.split_k > 1, NP=PACK_N, PREFETCH=cfg.prefetch,
        ASM=asm, IS_BF16=x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def wna16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, group_size: int, dtype: torch.dtype,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight ``[K, N]`` in ``dtype`` (rows in the packed, i.e. permuted, order).

    ``out``: optional storage with at least ``K * N`` elements of ``dtype`` (a scratch buffer
    shared by all layers); the result is a ``[K, N]`` view of its start.
    """
    _, kw, _ = qweight.shape
    N = scales.shape[1]
    K = kw * pack_factor(bits)
    if out is None:
        w = torch.empty(K, N, dtype=dtype, device=qweight.device)
    else:
        if out.dtype != dtype or out.numel() < K * N or not out.is_contiguous():
            raise ValueError(f"scratch of {out.numel()} {out.dtype} cannot hold a {K}x{N} {dtype} weight")
        w = out.view(-1)[: K * N].view(K, N)
    grid = (K // block_k(bits), triton.cdiv(N, PACK_N))
    _wna16_dequant_kernel[grid](qweight, scales, zeros if zeros is not None else scales, w, N, K, group_size,
                                BITS=bits, HAS_ZP=zeros is not None, NP=PACK_N, num_warps=4)
    return w


# Fixed launch table, by the largest M of each bucket:
# (max_m, use_dot, block_m, block_n, warps, stages, prefetch, waves). One-row decode uses the
# CUDA-core GEMV; up to DOT_MAX_M rows, tensor-core tiles; above it the layer dequantizes into a
# scratch buffer and calls cuBLAS (faster there on an H200, bench/gpu_w4a16.py --sweep).
BUCKETS = (  # the comments give the sweep (bench/results/h200-w4a16-<commit>.txt) each entry comes from
    (1, True, 16, 64, 4, 3, 1, 4),    # c95f51d: PTX dequant on tensor cores 78.6 us/layer; GEMV 88.5 (921726f)
    (16, True, 16, 128, 4, 3, 1, 2),  # sweep-2026-12-01: 84.5 us/layer; 16x64 tiles at 4 waves 90.9
    (32, True, 32, 64, 4, 3, 1, 4),
    (64, True, 32, 128, 4, 3, 1, 4),  # c95f51d: 168 us/layer; 64x128 tiles 189 (921726f)
    (128, True, 32, 128, 4, 3, 1, 4),  # sweep-2026-12-01: 289.6 us/layer; 64x128 at 2 waves 291.7-327
)
DOT_MAX_M = BUCKETS[-1][0]
SPLIT_K_MAX = 16


@lru_cache(maxsize=None)
def select_config(m: int, n: int, k: int, bits: int, num_sms: int) -> GemmConfig:
    """The launch for ``m`` rows (``1 <= m <= DOT_MAX_M``) of an ``[k] -> [n]`` layer.

    Depends on ``m`` only through its bucket, so the set of compiled variants per layer is fixed
    (all compiled when the decode graphs are captured). Split-K is chosen so that about
    ``waves * num_sms`` programs run, with the K blocks spread evenly.
    """
    for max_m, use_dot, bm, bn, warps, stages, prefetch, waves in BUCKETS:
        if m <= max_m:
            break
    else:
        raise ValueError(f"{m} rows is above the GEMM table ({DOT_MAX_M}); dequantize instead")
    tiles = triton.cdiv(max_m, bm) * triton.cdiv(n, bn)
    blocks = k // block_k(bits)
    split = max(1, min(SPLIT_K_MAX, blocks, triton.cdiv(waves * num_sms, tiles)))
    split = triton.cdiv(blocks, triton.cdiv(blocks, split))  # no empty splits
    return GemmConfig(use_dot, bm, bn, split, warps, stages, prefetch)


def counters_needed(n: int, k: int, bits: int, num_sms: int) -> int:
    """Split-K counters one layer needs for every bucket of ``select_config``."""
    need = 1
    for max_m, *_ in BUCKETS:
        cfg = select_config(max_m, n, k, bits, num_sms)
        if cfg.split_k > 1:
            need = max(need, triton.cdiv(max_m, cfg.block_m) * triton.cdiv(n, cfg.block_n))
    return need
