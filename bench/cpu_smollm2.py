"""CPU benchmark on the embedded SmolLM2-135M-Instruct: genserve vs transformers vs llama.cpp.

All peers run in the same process, one after the other, on the same prompts:
  - genserve: the engine directly (no HTTP), greedy, ignore_eos, in each ``--variants``
    configuration, [backend:]dtype/quantizer: ``none`` dequantizes the GGUF at load (the
    default, the reference), ``gguf`` serves its Q4_1 layers packed (``--quantize gguf``),
    another name (eetq, fp8) quantizes the dequantized weights at load; the backend (default
    ``auto``) is e.g. ``cpu`` or ``ipex`` (IPEX's paged attention and WOQ kernels, in a venv
    with intel-extension-for-pytorch: backends/ipex/README.md);
  - transformers ``generate``: fp32 dequantized from the same GGUF, batch 1 and a padded batch;
  - llama.cpp through llama-cpp-python on the same Q4_1 GGUF (batch 1), when installed.
Figures: output tokens/s at 1 request and at N concurrent requests, and time to first token.

    python bench/cpu_smollm2.py [--new-tokens 128] [--concurrency 16] [--json out.jsonl]
        [--variants float32/none,float32/gguf,bfloat16/none,float32/eetq]
        [--variants cpu:float32/gguf,ipex:float32/gguf,ipex:float32/none]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import torch

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def genserve_run(engine, prompts, new_tokens):
    from genserve.engine.offline import OfflineRequest, iter_steps
    from genserve.engine.sampling_params import SamplingParams

    t0 = time.perf_counter()
    first: dict[str, float] = {}
    requests = [OfflineRequest(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts]
    produced = 0
    for outputs in iter_steps(engine, requests):
        for out in outputs:
            produced += len(out.tokens)
            first.setdefault(out.request_id, time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return produced / wall, sum(first.values()) / len(first)


def transformers_run(model, prompts, new_tokens, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                       pad_token_id=pad_id)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
        wall = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts) / wall, ttft


def llamacpp_run(gguf_path, prompt_text, new_tokens, threads):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf_path, n_threads=threads, n_ctx=1024, verbose=False)
    llm(prompt_text, max_tokens=4)  # warm-up
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in llm(prompt_text, max_tokens=new_tokens, stream=True, temperature=0.0):
        first = first or time.perf_counter() - t0
        n += 1
    return n / (time.perf_counter() - t0), first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--hf-new-tokens", type=int, default=64, help="transformers is slow: fewer tokens")
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--variants", default="float32/none,float32/gguf",
                    help="genserve configurations to run, each [backend:]dtype/quantizer: e.g. "
                         "float32/none,float32/gguf,bfloat16/none,float32/eetq,ipex:float32/gguf")
    args = ap.parse_args()
    threads = torch.get_num_threads()

    from genserve.args import defaults
    from genserve.engine.build import build_engine

    results = []
    # The machine may be shared: the load average goes with every row (1, 5, 15 minutes).
    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"torch {torch.__version__}, {threads} threads, load average {load_before}")

    def record(metric, value, unit, eng, **extra):
        # The machine is shared: the 1-minute load average beside each figure says how quiet it was.
        load = round(os.getloadavg()[0], 2)
        results.append({"metric": metric, "value": round(value, 2), "unit": unit, "engine": eng,
                        "device": "cpu", "threads": threads, "load_avg_1m": load, **extra})
        print(f"{eng:13s} {metric:28s} {value:10.2f} {unit}  load {load:5.2f}  {extra or ''}")

    for variant in args.variants.split(","):
        backend, _, variant = variant.rpartition(":")
        dtype, quantize = variant.split("/")
        t0 = time.perf_counter()
        loaded = build_engine(defaults(dtype=dtype, quantize=None if quantize == "none" else quantize,
                                       backend=backend or "auto"))
        load_s = time.perf_counter() - t0
        tok, engine = loaded.tokenizer, loaded.engine
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                       tokenize=False)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        # Distinct prompts per request, so the prefix cache does not flatter the batch figure.
        prompts = [[(t + i) % 49000 if j == 3 else t for j, t in enumerate(prompt)]
                   for i in range(args.concurrency)]
        engine.blocks.enable_prefix_caching = False
        genserve_run(engine, [prompt], 8)  # warm-up
        tag = dict(dtype=dtype, quantize=quantize, backend=loaded.backend.name, attention=loaded.attention)
        record("load_s", load_s, "s", "genserve", **tag)
        tps, ttft = genserve_run(engine, [prompt], args.new_tokens)
        record("tok_s_b1", tps, "tok/s", "genserve", **tag)
        record("ttft_b1_ms", ttft * 1e3, "ms", "genserve", **tag)
        tps, ttft = genserve_run(engine, prompts, args.new_tokens)
        record(f"tok_s_c{args.concurrency}", tps, "tok/s", "genserve", **tag)
        record(f"ttft_c{args.concurrency}_ms", ttft * 1e3, "ms", "genserve", **tag)
        del engine

    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        src = loaded.source
        hf = AutoModelForCausalLM.from_pretrained(str(src.path), gguf_file=src.gguf_file,
                                                  dtype=torch.float32).eval()
        tps, ttft = transformers_run(hf, [prompt], args.hf_new_tokens, tok.pad_token_id or 0)
        record("tok_s_b1", tps, "tok/s", "transformers")
        record("ttft_b1_ms", ttft * 1e3, "ms", "transformers")
        tps, ttft = transformers_run(hf, prompts, args.hf_new_tokens, tok.pad_token_id or 0)
        record(f"tok_s_c{args.concurrency}", tps, "tok/s", "transformers")
        del hf

    src = loaded.source
    lc = llamacpp_run(str(src.path / src.gguf_file), text, args.new_tokens, threads)
    if lc:
        record("tok_s_b1", lc[0], "tok/s", "llama.cpp")
        record("ttft_b1_ms", lc[1] * 1e3, "ms", "llama.cpp")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(__file__)).stdout.strip()
    load_after = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at the end {load_after}")
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "commit": commit, "date": time.strftime("%Y-%m-%d"),
                                    "torch": torch.__version__, "loadavg_start": load_before,
                                    "loadavg_end": load_after}) + "\n")


if __name__ == "__main__":
    main()
