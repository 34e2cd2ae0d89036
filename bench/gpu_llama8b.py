"""Issue-5 benchmark: Llama-3-8B shape, bf16, random weights, on one GPU.

One run measures, side by side, genserve (engine API, no HTTP), HF transformers ``generate``
on the same random model, and the memory-bandwidth roofline (weight bytes / measured copy
bandwidth). Each figure is printed and appended to ``bench/results/<gpu>.jsonl`` as
``{metric, value, unit, engine, gpu, commit, date}``.

    python bench/gpu_llama8b.py                 # everything (512 sequences at most, graphs to 512)
    python bench/gpu_llama8b.py --only tpot_b1_ms,ttft_1x1024_ms --skip-hf
    python bench/gpu_llama8b.py --tiny          # a small model, to check the script on any device
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
METRICS = ("tpot_b1_ms", "tpot_b16_ms", "decode_tok_s_128x32x2048", "prefill_tok_s_32x4096",
           "ttft_1x1024_ms", "offline_tok_s_1000", "decode_tok_s_256x2048x256")
# Weight variants of the same model shape: metric names take the suffix, e.g. tpot_b1_ms_w4a16.
# w4a16: GPTQ-style 4-bit weights, group 128, symmetric, random packed values (dummy load).
VARIANTS = {
    "bf16": ("", None),
    "w4a16": ("_w4a16", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                         "sym": True, "checkpoint_format": "gptq"}),
    # Online: the bf16 dummy weights quantized at load (--quantize fp8), no quantization_config
    # written (an fp8 checkpoint config would make the flag refuse the model).
    "fp8": ("_fp8", {"quant_method": "fp8", "online": True}),
    # bf16 weights, float8 KV cache (--kv-cache-dtype fp8): long-context decode reads half the KV bytes.
    "kvfp8": ("_kvfp8", None),
    # both: float8 weights (W8A8 / weight-only GEMV) and a float8 KV cache
    "fp8kv": ("_fp8_kvfp8", {"quant_method": "fp8", "online": True}),
}
ENGINE_FLAGS = {"kvfp8": {"kv_cache_dtype": "fp8"}, "fp8kv": {"kv_cache_dtype": "fp8"}}  # added engine flags


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


class Recorder:
    def __init__(self, gpu: str, out_dir: str):
        self.gpu, self.rows = gpu, []
        self.path = os.path.join(out_dir, gpu.replace(" ", "_") + ".jsonl")
        self.meta = {"gpu": gpu, "commit": os.environ.get("GENSERVE_COMMIT") or commit(),
                     "date": time.strftime("%Y-%m-%d")}

    def __call__(self, metric, value, unit, engine, **extra):
        row = {"metric": metric, "value": round(float(value), 3), "unit": unit, "engine": engine,
               **self.meta, **extra}
        self.rows.append(row)
        print(f"{engine:13s} {metric:28s} {value:12.2f} {unit}" + (f"  {extra}" if extra else ""), flush=True)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def random_prompt(rng, n, vocab):
    return [rng.randrange(100, vocab - 1) for _ in range(n)]


# -- genserve -------------------------------------------------------------------------------
def build_genserve(model_dir, args, quantize=None, **extra):
    from genserve.args import defaults
    from genserve.engine.build import build_engine
    from genserve.engine.warmup import warm_up
    from genserve_cuda.layer_ops import CudaLayerOps

    flags = dict(model_id=model_dir, load_format="dummy", backend=args.backend, dtype="bfloat16",
                 max_batch_prefill_tokens=args.prefill_chunk, max_batch_size=args.max_batch_size,
                 cuda_memory_fraction=0.92)
    if args.cuda_graphs is not None:
        flags["cuda_graphs"] = args.cuda_graphs
    if quantize:
        flags["quantize"] = quantize
    flags.update(extra)
    loaded = build_engine(defaults(**flags))
    t0 = time.perf_counter()
    warm_up(loaded.engine, loaded.model_config.vocab_size)  # as the server does before serving
    print(f"warm-up {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"genserve: backend {loaded.backend.name}, attention {loaded.attention}, "
          f"KV blocks {loaded.engine.blocks.num_blocks}, load {loaded.load_seconds:.1f}s", flush=True)
    ops = loaded.engine.runner.model.ctx.layer_ops
    for row in ops.gemv.report if isinstance(ops, CudaLayerOps) else []:
        print(f"  one-row GEMV {row}", flush=True)
    return loaded.engine


STEPS: dict[str, int] = {}  # what the last run_requests did: steps, steps with prefill, seqs summed


def offline_workload(vocab: int, n: int = 1000) -> tuple[list[list[int]], list[int]]:
    """ShareGPT-like mix: log-normal lengths (medians ~ 140 in, ~ 190 out), clipped. Its own
    generator: the workload must not depend on which other figures ran first (the long-output
    tail decides much of the wall time)."""
    rng = random.Random(0)
    lens_in = [min(2000, max(4, int(rng.lognormvariate(4.95, 1.0)))) for _ in range(n)]
    lens_out = [min(1500, max(4, int(rng.lognormvariate(5.25, 0.8)))) for _ in range(n)]
    return [random_prompt(rng, k, vocab) for k in lens_in], lens_out


def run_requests(engine, prompts, out_lens):
    """Submit everything at once; return (wall seconds, output tokens, per-request token times)."""
    from genserve.engine.offline import OfflineRequest, iter_steps
    from genserve.engine.sampling_params import SamplingParams

    engine.blocks.reset_prefix_cache()
    gc.collect()  # start each figure without the previous one's garbage
    t0 = time.perf_counter()
    requests = [OfflineRequest(p, SamplingParams(max_new_tokens=n, ignore_eos=True), request_id=f"b{t0}-{i}")
                for i, (p, n) in enumerate(zip(prompts, out_lens))]
    times: dict[str, list[float]] = {r.request_id: [] for r in requests}
    produced = 0
    STEPS.update(steps=0, mixed=0, seqs=0)
    for outs in iter_steps(engine, requests):
        st = engine.last_step_stats
        STEPS["steps"] += 1
        STEPS["mixed"] += bool(st.get("is_prefill"))
        STEPS["seqs"] += st.get("num_seqs", 0)
        for out in outs:
            now = time.perf_counter()
            produced += len(out.tokens)
            times[out.request_id].extend([now] * len(out.tokens))
    return time.perf_counter() - t0, produced, t0, times


def genserve_suite(engine, rec, vocab, only, rng, suffix=""):
    def record(metric, *a, **kw):
        rec(metric + suffix, *a, **kw)

    for batch in (1, 16):
        if f"tpot_b{batch}_ms" in only:
            run_requests(engine, [random_prompt(rng, 128, vocab) for _ in range(batch)], [16] * batch)
            _, _, _, times = run_requests(engine, [random_prompt(rng, 128, vocab) for _ in range(batch)],
                                          [257] * batch)
            per_token = sorted((t[-1] - t[0]) / (len(t) - 1) for t in times.values())
            record(f"tpot_b{batch}_ms", per_token[len(per_token) // 2] * 1e3, "ms", "genserve")
    if "ttft_1x1024_ms" in only:
        samples = []
        for _ in range(9):
            _, _, t0, times = run_requests(engine, [random_prompt(rng, 1024, vocab)], [1])
            samples.append((next(iter(times.values()))[0] - t0) * 1e3)
        record("ttft_1x1024_ms", sorted(samples)[len(samples) // 2], "ms", "genserve",
            samples_ms=[round(x, 2) for x in samples])
    if "prefill_tok_s_32x4096" in only:
        # Warm-up: one step of this shape first (cuBLAS heuristics, kernel specialisations), as
        # the other figures get from their own warm-up or median.
        run_requests(engine, [random_prompt(rng, 4096, vocab) for _ in range(2)], [1] * 2)
        prompts = [random_prompt(rng, 4096, vocab) for _ in range(32)]
        wall, _, _, _ = run_requests(engine, prompts, [1] * 32)
        record("prefill_tok_s_32x4096", 32 * 4096 / wall, "tok/s", "genserve")
    if "decode_tok_s_128x32x2048" in only:
        prompts = [random_prompt(rng, 32, vocab) for _ in range(128)]
        wall, produced, _, _ = run_requests(engine, prompts, [2048] * 128)
        record("decode_tok_s_128x32x2048", produced / wall, "tok/s", "genserve")
    if "decode_tok_s_256x2048x256" in only:
        # long contexts: 256 sequences of 2048-2304 tokens, where attention reads more KV bytes
        # per step than the weights (the case a float8 KV cache is for)
        # decode only: from the moment the last request got its first token (all 256 decoding)
        # to the last token; the 524k-token prefill before it is not counted
        prompts = [random_prompt(rng, 2048, vocab) for _ in range(256)]
        _, _, _, times = run_requests(engine, prompts, [256] * 256)
        start = max(t[0] for t in times.values())
        after = sum(sum(1 for x in t if x > start) for t in times.values())
        end = max(t[-1] for t in times.values())
        record("decode_tok_s_256x2048x256", after / (end - start), "tok/s", "genserve",
               decode_tokens=after)
    if "offline_tok_s_1000" in only:
        prompts, lens_out = offline_workload(vocab)
        lens_in = [len(p) for p in prompts]
        wall, produced, _, _ = run_requests(engine, prompts, lens_out)
        record("offline_tok_s_1000", produced / wall, "tok/s", "genserve",
            mean_in=sum(lens_in) / 1000, mean_out=sum(lens_out) / 1000, steps=STEPS["steps"],
            steps_with_prefill=STEPS["mixed"], mean_batch=round(STEPS["seqs"] / max(1, STEPS["steps"]), 1))


# -- transformers ---------------------------------------------------------------------------
def transformers_suite(config, rec, vocab, only, rng):
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()

    def gen(batch, n_in, n_out):
        ids = torch.tensor([random_prompt(rng, n_in, vocab) for _ in range(batch)], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out,
                           min_new_tokens=n_out, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(1, 16, 4)  # warm-up
    if "tpot_b1_ms" in only:
        short, long = gen(1, 128, 2), gen(1, 128, 66)
        rec("tpot_b1_ms", (long - short) / 64 * 1e3, "ms", "transformers")
    if "ttft_1x1024_ms" in only:
        rec("ttft_1x1024_ms", sorted(gen(1, 1024, 1) for _ in range(3))[1] * 1e3, "ms", "transformers")
    if "prefill_tok_s_32x4096" in only:
        gen(2, 4096, 1)  # warm-up at this prompt length, as for genserve
        rec("prefill_tok_s_32x4096", 32 * 4096 / gen(32, 4096, 1), "tok/s", "transformers")
    if "decode_tok_s_128x32x2048" in only:
        # 2048 new tokens for 128 requests takes transformers minutes: measure 128 x 512/128
        # as the reference does and say so in the row.
        rec("decode_tok_s_128x32x2048", 128 * 128 / gen(128, 512, 128), "tok/s", "transformers",
            shape="128x512x128")
    model = None  # release the weights before the next figures
    gc.collect()
    torch.cuda.empty_cache()


# -- roofline -------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    n = 1 << 30  # 1 GiB of bf16
    a = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    del a, b
    return 2 * n / seconds  # bytes read + written


def roofline(config, rec, only, variants):
    """Batch-1 time per token if a decode step only read its weights once at copy bandwidth.

    bf16: every weight at 2 bytes (the embedding counts as the LM head's twin). w4a16: the
    linear layers' packed 4-bit weights plus one bf16 scale per group of 128, the LM head in
    bf16 (it stays unquantized), the embedding row gather ignored. fp8: the linear layers at one
    byte per weight plus a float32 scale per output channel, the LM head in bf16."""
    bw = copy_bandwidth()
    h, i, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    linear = L * (h * (h + 2 * kv) + h * h + 3 * h * i)
    out_channels = L * ((h + 2 * kv) + h + 2 * i + h)
    weight_bytes = {"bf16": 2 * (linear + 2 * V * h), "w4a16": linear // 2 + linear // 128 * 2 + 2 * V * h,
                    "fp8": linear + 4 * out_channels + 2 * V * h}
    weight_bytes["kvfp8"], weight_bytes["fp8kv"] = weight_bytes["bf16"], weight_bytes["fp8"]
    rec("copy_bandwidth_gb_s", bw / 1e9, "GB/s", "roofline")
    if "tpot_b1_ms" in only:
        for v in variants:
            rec("tpot_b1_ms" + VARIANTS[v][0], weight_bytes[v] / bw * 1e3, "ms", "roofline",
                weight_gb=weight_bytes[v] / 1e9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(METRICS))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    # 512 sequences (decode graphs up to 512): the offline mix keeps ~150 running on average
    # and a larger batch amortises the weight reads over more tokens (vLLM's offline
    # defaults allow up to 1,024). The other figures don't reach 256 sequences.
    ap.add_argument("--cuda-graphs", default="1,2,4,8,16,32,64,128,192,256,320,384,448,512",
                    help="decode graph batch sizes")
    ap.add_argument("--max-batch-size", type=int, default=512)
    ap.add_argument("--variants", default="bf16", help=f"weight variants, in order: {','.join(VARIANTS)}")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown --variants {unknown}; known: {list(VARIANTS)}")

    from transformers import LlamaConfig

    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    model_dir = tempfile.mkdtemp(prefix="genserve-bench-")
    config.save_pretrained(model_dir)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rec = Recorder(gpu + ("-tiny" if args.tiny else ""), args.out)
    rng = random.Random(0)
    print(f"device {gpu}, torch {torch.__version__}, commit {rec.meta['commit']}", flush=True)

    if torch.cuda.is_available():
        roofline(config, rec, only, variants)
    for variant in variants:
        suffix, quant = VARIANTS[variant]
        vdir = model_dir
        if quant and not quant.get("online"):
            vdir = tempfile.mkdtemp(prefix=f"genserve-bench-{variant}-")
            qconfig = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
            qconfig.quantization_config = quant
            qconfig.save_pretrained(vdir)
        engine = build_genserve(vdir, args, quantize=quant and quant["quant_method"],
                                **ENGINE_FLAGS.get(variant, {}))
        gc.collect()
        gc.freeze()  # as the server does after loading
        genserve_suite(engine, rec, config.vocab_size, only, rng, suffix)
        del engine
        gc.unfreeze()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if not args.skip_hf:
            transformers_suite(config, rec, config.vocab_size, only, rng)
    print("\nsummary (jsonl at %s)" % rec.path)
    for r in rec.rows:
        print(f"  {r['engine']:13s} {r['metric']:28s} {r['value']:>12} {r['unit']}")


if __name__ == "__main__":
    sys.exit(main())
