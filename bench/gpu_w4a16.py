"""Kernel-level benchmark of ``triton_w4a16`` on Llama-3-8B layer shapes (for the device machine).

    python bench/gpu_w4a16.py [--out DIR] [--sweep] [--no-record]

For each layer shape (QKV 4096->6144, O 4096->4096, gate/up 4096->28672, down 14336->4096) and
M in {1, 16, 64, 128, 512, 4096}: random weights quantized in-process (GPTQ-style symmetric 4-bit,
group 128), the kernel's ``apply`` against bf16 ``F.linear`` on the same shape. Each timing
rotates over enough copies of the weights to exceed the 60 MB L2 several times, so weights
stream from HBM as in a real forward; M <= 256 replays one CUDA graph over all copies (the
decode case), larger M is timed eagerly (launch gaps are negligible there). Medians of
``triton.testing.do_bench``. Achieved bandwidth counts the packed weights, scales, x and y
once, against a measured device-to-device copy.

Then the implied batch-1 (and batch-16) time per token of the whole model's GEMMs: 32 layers of
the four shapes plus the bf16 LM head, against the roofline (bytes over copy bandwidth).
``--sweep`` also times alternative launch configs (for choosing the fixed table).
Rows go to ``DIR/<gpu>.jsonl`` (``{metric, value, unit, engine, gpu, commit, date, ...}``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import graph_ms, median_ms  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # name: (out N, in K) of Llama-3-8B's linears (one layer)
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
LM_HEAD = (128256, 4096)
LAYERS = 32
MS = (1, 16, 64, 128, 512, 4096)
ROTATE_BYTES = 256 << 20  # > 4x the H200's 60 MB L2


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


class Recorder:
    def __init__(self, gpu: str, out_dir: str | None):
        self.path = os.path.join(out_dir, gpu.replace(" ", "_") + ".jsonl") if out_dir else None
        self.meta = {"gpu": gpu, "commit": os.environ.get("GENSERVE_COMMIT") or commit(),
                     "date": time.strftime("%Y-%m-%d")}

    def __call__(self, metric, value, unit, **extra):
        row = {"metric": metric, "value": round(float(value), 4), "unit": unit, "engine": "genserve",
               **self.meta, **extra}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), rep=100)
    return 2 * (1 << 30) / (ms * 1e-3)


def quantize_sym(w: torch.Tensor, bits=4, group=128):
    """GPTQ-style round-to-nearest, symmetric, per group along K. ``w [N, K]`` -> canonical form."""
    from genserve.layers.quantization.kernels import WNA16Weights

    N, K = w.shape
    g = w.t().float().reshape(K // group, group, N)
    scale = (g.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).clamp(min=1e-8)
    q = ((g / scale[:, None]).round() + 2 ** (bits - 1)).clamp(0, 2 ** bits - 1)
    return WNA16Weights(q.reshape(K, N).to(torch.uint8), scale.to(torch.bfloat16))


class Shape:
    """One layer shape: ``sets`` copies of the packed weights and of the bf16 weights."""

    def __init__(self, n, k, bits=4, group=128):
        from genserve.layers.quantization.kernels import WNA16Config
        from genserve_cuda.quant.triton_w4a16 import TritonW4A16Kernel

        self.n, self.k = n, k
        torch.manual_seed(n + k)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        weights = quantize_sym(w, bits, group)
        del w
        self.config = WNA16Config(bits=bits, group_size=group, has_zero_points=False, act_order=False,
                                  in_features=k, out_features=n, act_dtype=torch.bfloat16)
        self.kernel = TritonW4A16Kernel(self.config)
        first = nn.Module()
        self.kernel.process_weights(first, weights)
        self.dense = weights.dequantize(self.config, torch.bfloat16)       # [N, K]
        self.packed_bytes = sum(t.numel() * t.element_size() for t in
                                (first.w4a16_qweight, first.w4a16_scales))
        n_q = max(2, math.ceil(ROTATE_BYTES / self.packed_bytes))
        self.layers = [first]
        for _ in range(n_q - 1):
            lay = nn.Module()
            for name in ("w4a16_qweight", "w4a16_scales", "w4a16_zeros", "w4a16_perm", "w4a16_counters"):
                t = getattr(first, name)
                lay.register_buffer(name, None if t is None else t.clone(), persistent=False)
            self.layers.append(lay)
        n_d = max(2, math.ceil(ROTATE_BYTES / (self.dense.numel() * 2)))
        self.denses = [self.dense] + [self.dense.clone() for _ in range(n_d - 1)]

    def ours(self, x):
        for lay in self.layers:
            self.kernel.apply(lay, x, None)

    def bf16(self, x):
        for w in self.denses:
            F.linear(x, w)


def time_per_call(fn, n_calls, m) -> float:
    return (graph_ms(fn) if m <= 256 else median_ms(fn, rep=100)) / n_calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--sweep", action="store_true", help="also time alternative launch configs")
    ap.add_argument("--no-record", action="store_true", help="print only, write no jsonl rows")
    ap.add_argument("--tinygemm", action="store_true", help="with --sweep: also time torch's int4 kernel")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="comma-separated M values")
    args = ap.parse_args()
    ms = tuple(int(v) for v in args.ms.split(","))
    sys.path[:0] = [os.path.join(ROOT, "core"), os.path.join(ROOT, "backends", "cuda")]
    from genserve_cuda.kernels.w4a16 import (
        DOT_MAX_M,
        GemmConfig,
        select_config,
        wna16_dequantize,
        wna16_gemm,
    )

    gpu = torch.cuda.get_device_name()
    rec = Recorder(gpu, None if args.no_record else args.out)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth()
    print(f"device {gpu} ({sms} SMs), torch {torch.__version__}, commit {rec.meta['commit']}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rec("copy_bandwidth_tb_s", bw / 1e12, "TB/s")
    table = []   # (shape, m, ours us, bf16 us, ours TB/s, rel err)
    per_m = {m: [0.0, 0.0] for m in ms}  # m -> [ours us, bf16 us] summed over one layer's four GEMMs
    layer_bytes = 0
    for name, (n, k) in SHAPES.items():
        sh = Shape(n, k)
        layer_bytes += sh.packed_bytes
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), sh.dense.float())
            out = sh.kernel.apply(sh.layers[0], x, None)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err < 1e-2 and torch.isfinite(out).all(), (name, m, err)
            t_ours = time_per_call(lambda sh=sh, x=x: sh.ours(x), len(sh.layers), m) * 1e3
            t_bf16 = time_per_call(lambda sh=sh, x=x: sh.bf16(x), len(sh.denses), m) * 1e3
            moved = sh.packed_bytes + 2 * m * (n + k)
            tbs = moved / (t_ours * 1e-6) / 1e12
            path = "dequant+cublas" if m > DOT_MAX_M else str(select_config(m, n, k, 4, sms))
            table.append((name, m, t_ours, t_bf16, tbs, err, path))
            per_m[m][0] += t_ours
            per_m[m][1] += t_bf16
            print(f"{name:8s} M={m:5d}  w4a16 {t_ours:9.2f} us  bf16 {t_bf16:9.2f} us  x{t_bf16 / t_ours:5.2f}  "
                  f"{tbs:5.2f} TB/s ({100 * tbs * 1e12 / bw:3.0f}% of copy)  err {err:.1e}  {path}", flush=True)
            rec("w4a16_gemm_us", t_ours, "us", shape=name, n=n, k=k, m=m, bf16_us=round(t_bf16, 3),
                tb_s=round(tbs, 3), copy_share=round(tbs * 1e12 / bw, 3), rel_err=err, path=path,
                quant="gptq-sym-4bit-g128")
            if args.sweep:
                sweep(sh, x, ref, m, n, k, sms, bw, GemmConfig, wna16_gemm, wna16_dequantize, select_config,
                      DOT_MAX_M)
                if args.tinygemm:
                    tinygemm(sh, x, ref, m, n, k)
        sh = None  # free this shape's weight copies before the next
        torch.cuda.empty_cache()

    # the bf16 LM head at M=1 and M=16, as the model runs it
    head = torch.randn(*LM_HEAD, device="cuda", dtype=torch.bfloat16) / 64
    heads = [head, head.clone()]
    head_us = {}
    for m in (1, 16):
        x = torch.randn(m, LM_HEAD[1], device="cuda", dtype=torch.bfloat16)
        head_us[m] = graph_ms(lambda x=x: [F.linear(x, h) for h in heads]) / 2 * 1e3
    head_bytes = head.numel() * 2
    roof_ms = (LAYERS * layer_bytes + head_bytes) / bw * 1e3
    for m in (1, 16):
        if m not in per_m:
            continue
        ours_ms = (LAYERS * per_m[m][0] + head_us[m]) / 1e3
        bf16_ms = (LAYERS * per_m[m][1] + head_us[m]) / 1e3
        print(f"implied GEMM time per token step, batch {m}: w4a16 {ours_ms:.3f} ms, bf16 {bf16_ms:.3f} ms, "
              f"roofline {roof_ms:.3f} ms (packed {LAYERS * layer_bytes / 1e9:.2f} GB + bf16 head "
              f"{head_bytes / 1e9:.2f} GB at {bw / 1e12:.2f} TB/s; head {head_us[m]:.1f} us)", flush=True)
        rec(f"w4a16_gemm_step_ms_b{m}_implied", ours_ms, "ms", bf16_ms=round(bf16_ms, 4),
            roofline_ms=round(roof_ms, 4), lm_head_us=round(head_us[m], 2))

    print("\nshape     M      w4a16 us   bf16 us  speedup  TB/s  rel err")
    for name, m, t, tb, tbs, err, _ in table:
        print(f"{name:8s} {m:5d} {t:10.2f} {tb:9.2f} {tb / t:8.2f} {tbs:5.2f}  {err:.1e}")


def sweep(sh, x, ref, m, n, k, sms, bw, GemmConfig, wna16_gemm, wna16_dequantize, select_config, DOT_MAX_M):
    """Alternative launches for this (shape, M): printed, not recorded."""
    cands = []
    base = select_config(m, n, k, 4, sms) if m <= DOT_MAX_M else None
    blocks = k // 128

    def splits(tiles):
        b = max(1, min(16, blocks, -(-4 * sms // tiles)))
        return sorted({max(1, b // 2), b})

    tiles_by_m = {  # (block_m, block_n, warps, stages) tried per M on tensor cores
        1: ((16, 64, 4, 3), (16, 128, 4, 3)),
        16: ((16, 64, 4, 3), (16, 128, 4, 3)),
        64: ((32, 128, 4, 3), (32, 64, 4, 3), (64, 128, 4, 3)),
        128: ((64, 128, 4, 3), (32, 128, 4, 3), (128, 128, 8, 3)),
    }
    if m == 1:
        for split in splits(-(-n // 64)):
            cands.append((GemmConfig(False, 1, 64, split, 2, 3, 2), None))
    if m in tiles_by_m:  # tensor cores (M = 1 padded to a 16-row tile), PTX dequantization unless noted
        for bm, bn, warps, stages in tiles_by_m[m]:
            tiles = -(-m // bm) * -(-n // bn)
            for s in splits(tiles):
                cands.append((GemmConfig(True, bm, bn, s, warps, stages, 1), None))
    else:
        return
    if base is not None:
        cands.append((base, False))  # the table's launch with the pure-Triton dequantization (before)
        if (base, None) not in cands:
            cands.append((base, None))
    for cfg, asm in cands:
        tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
        counters = [torch.zeros(tiles, dtype=torch.int32, device="cuda") for _ in sh.layers]

        def run(cfg=cfg, counters=counters, asm=asm):
            for lay, cnt in zip(sh.layers, counters):
                wna16_gemm(x, lay.w4a16_qweight, lay.w4a16_scales, None, None, cnt, 4, 128, cfg, asm=asm)

        try:
            out = wna16_gemm(x, sh.layers[0].w4a16_qweight, sh.layers[0].w4a16_scales, None, None,
                             counters[0], 4, 128, cfg, asm=asm)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            t = graph_ms(run, rep=60) / len(sh.layers) * 1e3
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            print(f"   sweep {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        moved = sh.packed_bytes + 2 * m * (n + k)
        tag = " triton-dequant" if asm is False else ""
        print(f"   sweep M={m:4d} {cfg}{tag}: {t:8.2f} us {moved / (t * 1e-6) / 1e12:5.2f} TB/s err {err:.1e}",
              flush=True)
    if m >= 64:
        def deq():
            for lay in sh.layers:
                w = wna16_dequantize(lay.w4a16_qweight, lay.w4a16_scales, None, 4, 128, torch.bfloat16)
                torch.mm(x, w)
        t = median_ms(deq, rep=60) / len(sh.layers) * 1e3
        print(f"   sweep M={m:4d} dequant+cublas: {t:8.2f} us", flush=True)


def tinygemm(sh, x, ref, m, n, k, group=128):
    """torch's built-in int4 kernel (``aten._weight_int4pack_mm``, "tinygemm") on the same weights.

    Its rule is ``w = (q - 8) * scale + zero``, so a GPTQ zero point ``z`` becomes the float
    ``zero = (8 - z) * scale`` (here symmetric: ``z = 8``, zero = 0). Printed, not recorded.
    """
    from genserve_cuda.kernels.w4a16 import unpack_wna16

    lay = sh.layers[0]
    q = unpack_wna16(lay.w4a16_qweight, 4, n).t().contiguous().to(torch.int32)   # [N, K]
    scales = lay.w4a16_scales                                                      # [G, N]
    sz = torch.stack([scales, torch.zeros_like(scales)], dim=-1).contiguous()      # [G, N, 2]
    for tiles in (8, 4, 2):
        for order in ("hi_even", "lo_even"):
            if order == "hi_even":
                u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            else:
                u8 = (q[:, 1::2] << 4 | q[:, ::2]).to(torch.uint8)
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack(u8, tiles)
                out = torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                print(f"   tinygemm tiles={tiles} {order}: failed {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            err = ((out.float() - ref).norm() / ref.norm()).item()
            if err > 0.05:
                print(f"   tinygemm tiles={tiles} {order}: wrong (err {err:.2e})", flush=True)
                continue
            copies = [packed] + [packed.clone() for _ in range(len(sh.layers) - 1)]
            t = graph_ms(lambda: [torch.ops.aten._weight_int4pack_mm(x, p, group, sz) for p in copies],
                         rep=60) / len(copies) * 1e3
            moved = sh.packed_bytes + 2 * m * (n + k)
            print(f"   tinygemm M={m:4d} tiles={tiles} {order}: {t:8.2f} us "
                  f"{moved / (t * 1e-6) / 1e12:5.2f} TB/s err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
