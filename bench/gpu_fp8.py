"""Kernel-level benchmark of the FP8 linear on Llama-3-8B layer shapes (for the device machine).

    python bench/gpu_fp8.py [--out DIR] [--no-record] [--ms 1,16,128,4096]

For each layer shape and M: bf16 ``F.linear`` (cuBLAS) against
- ``fp8_torch_quant``: W8A8 with the activations quantized by the torch reference ops
  (five launches) then ``torch._scaled_mm`` (what ``cuda_fp8_scaled_mm`` did before);
- ``fp8_fused_quant``: the same GEMM after the one-launch Triton quantization (``per_token_fp8``);
- ``fp8_gemv`` (M = 1): the weight-only float8 GEMV, for every ``GemvConfig`` candidate;
- ``kernel``: what ``CudaScaledMMFP8Kernel.apply`` runs for that M.
Weights rotate over enough copies to exceed the L2 several times; M <= 256 replays CUDA graphs.
Bandwidth counts the float8 weights once, against a measured device-to-device copy.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_w4a16 import LAYERS, LM_HEAD, ROOT, ROTATE_BYTES, SHAPES, Recorder, copy_bandwidth, graph_ms, median_ms  # noqa: E402,I001


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--ms", default="1,16,128,4096")
    args = ap.parse_args()
    sys.path[:0] = [os.path.join(ROOT, "core"), os.path.join(ROOT, "backends", "cuda")]
    from genserve.layers.quantization.fp8_kernels import (
        FP8LinearConfig,
        quantize_fp8_per_channel,
        quantize_fp8_per_token,
    )
    from genserve_cuda.kernels.fp8_quant import per_token_fp8
    from genserve_cuda.kernels.gemv import CANDIDATES, FP8_CONFIG, GemvConfig, gemv
    from genserve_cuda.quant.scaled_mm_fp8 import CudaScaledMMFP8Kernel

    gpu = torch.cuda.get_device_name()
    rec = Recorder(gpu, None if args.no_record else args.out)
    bw = copy_bandwidth()
    print(f"device {gpu}, torch {torch.__version__}, commit {rec.meta['commit']}; copy {bw / 1e12:.2f} TB/s",
          flush=True)
    ms = [int(v) for v in args.ms.split(",")]
    gemv_cfgs = sorted({FP8_CONFIG, *CANDIDATES, GemvConfig(16, 512, 8, 3), GemvConfig(4, 1024, 4, 3),
                        GemvConfig(8, 1024, 8, 3), GemvConfig(2, 1024, 4, 4)}, key=str)
    per_m: dict[int, list[float]] = {m: [0.0, 0.0] for m in ms}   # kernel us, bf16 us per layer
    layer_bytes = 0
    for name, (n, k) in SHAPES.items():
        torch.manual_seed(n + k)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        q, scale = quantize_fp8_per_channel(w)
        layer_bytes += q.numel()
        kernel = CudaScaledMMFP8Kernel(FP8LinearConfig(k, n, torch.bfloat16))
        layers = []
        for _ in range(max(2, math.ceil(ROTATE_BYTES / q.numel()))):
            lay = torch.nn.Module()
            kernel.process_weights(lay, q.clone(), scale)
            layers.append(lay)
        dense = [w] + [w.clone() for _ in range(max(1, math.ceil(ROTATE_BYTES / (2 * w.numel())) - 1))]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            timer = graph_ms if m <= 256 else median_ms

            def per_call(fn, count):
                return timer(fn) / count * 1e3

            t_bf16 = per_call(lambda: [F.linear(x, d) for d in dense], len(dense))

            def torch_quant():
                for lay in layers:
                    qx, sx = quantize_fp8_per_token(x)
                    torch._scaled_mm(qx, lay.weight_fp8.t(), scale_a=sx, scale_b=lay.weight_scale,
                                     out_dtype=torch.bfloat16)

            def fused_quant():
                for lay in layers:
                    qx, sx = per_token_fp8(x)
                    torch._scaled_mm(qx, lay.weight_fp8.t(), scale_a=sx, scale_b=lay.weight_scale,
                                     out_dtype=torch.bfloat16)

            t_torch = per_call(torch_quant, len(layers))
            t_fused = per_call(fused_quant, len(layers))
            t_kernel = per_call(lambda: [kernel.apply(lay, x, None) for lay in layers], len(layers))
            ref = F.linear(x.float(), (q.float() * scale))
            err = ((kernel.apply(layers[0], x, None).float() - ref).norm() / ref.norm()).item()
            tbs = (q.numel() + 2 * m * (n + k)) / (t_kernel * 1e-6) / 1e12
            print(f"{name:8s} M={m:5d} bf16 {t_bf16:8.2f} us | fp8 torch-quant {t_torch:8.2f} fused-quant "
                  f"{t_fused:8.2f} kernel {t_kernel:8.2f} us x{t_bf16 / t_kernel:4.2f} {tbs:4.2f} TB/s "
                  f"({100 * tbs * 1e12 / bw:3.0f}%) err {err:.1e}", flush=True)
            rec("fp8_linear_us", t_kernel, "us", shape=name, n=n, k=k, m=m, bf16_us=round(t_bf16, 3),
                torch_quant_us=round(t_torch, 3), fused_quant_us=round(t_fused, 3), rel_err=err)
            per_m[m][0] += t_kernel
            per_m[m][1] += t_bf16
            if m == 1:
                for cfg in gemv_cfgs:
                    s = layers[0].weight_scale.view(-1)
                    t = per_call(lambda cfg=cfg: [gemv(x, lay.weight_fp8, None, cfg, scale=s) for lay in layers],
                                 len(layers))
                    mark = " <- FP8_CONFIG" if cfg == FP8_CONFIG else ""
                    print(f"   fp8 gemv {cfg}: {t:8.2f} us {q.numel() / (t * 1e-6) / 1e12:4.2f} TB/s{mark}",
                          flush=True)
        layers = dense = w = None  # free this shape before the next
        torch.cuda.empty_cache()
    head = torch.randn(*LM_HEAD, device="cuda", dtype=torch.bfloat16) / 64
    heads = [head, head.clone()]
    for m in (1, 16):
        if m not in per_m:
            continue
        xh = torch.randn(m, LM_HEAD[1], device="cuda", dtype=torch.bfloat16)
        head_us = graph_ms(lambda: [F.linear(xh, h) for h in heads]) / 2 * 1e3
        ours = (LAYERS * per_m[m][0] + head_us) / 1e3
        bf16 = (LAYERS * per_m[m][1] + head_us) / 1e3
        roof = (LAYERS * layer_bytes + head.numel() * 2) / bw * 1e3
        print(f"implied GEMM time per step, batch {m}: fp8 {ours:.3f} ms, bf16 {bf16:.3f} ms, roofline {roof:.3f} ms",
              flush=True)
        rec(f"fp8_gemm_step_ms_b{m}_implied", ours, "ms", bf16_ms=round(bf16, 4), roofline_ms=round(roof, 4))


if __name__ == "__main__":
    main()
