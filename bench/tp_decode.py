"""Tensor-parallel decode: --num-shard 1 vs 2 on a Llama-3-8B-shaped model with dummy weights.

Figures per shard count (the engine directly, no HTTP; greedy, ignore_eos):
  - batch 1: time per output token (mean decode-step time of one request);
  - N concurrent requests (default 128): decode throughput in output tokens/s over the steps
    that only decode, and the end-to-end output tokens/s including the prefills.
Each shard count runs in a fresh process (clean GPU memory, fresh process groups).

    python bench/tp_decode.py [--shards 1,2] [--concurrency 128] [--new-tokens 256] [--json out.jsonl]
    python bench/tp_decode.py --tiny --backend cpu     # a smoke test of the script itself
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
            rms_norm_eps=1e-5, tie_word_embeddings=False)


def write_config(folder: str, tiny: bool) -> None:
    from transformers import LlamaConfig

    LlamaConfig(**(TINY if tiny else LLAMA3_8B)).save_pretrained(folder)


def decode(engine, prompts, new_tokens) -> dict:
    """Run ``prompts`` to completion; times every step, split into decode-only and the rest."""
    from genserve.engine.offline import OfflineRequest, iter_steps
    from genserve.engine.sampling_params import SamplingParams

    requests = [OfflineRequest(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in prompts]
    decode_s, decode_tokens, produced = 0.0, 0, 0
    t0 = time.perf_counter()
    engine.last_step_stats = {}  # a step that schedules nothing leaves the last one's behind
    for outputs in iter_steps(engine, requests):
        tokens = sum(len(out.tokens) for out in outputs)
        produced += tokens
        stats = engine.last_step_stats
        if stats and not stats["is_prefill"]:
            decode_s += stats["duration"]
            decode_tokens += tokens
        engine.last_step_stats = {}  # cleared for the next step, as before the first
    wall = time.perf_counter() - t0
    return {"decode_s": decode_s, "decode_tokens": decode_tokens, "produced": produced, "wall_s": wall}


def child(opts) -> dict:
    import faulthandler
    import os

    from genserve.args import defaults
    from genserve.executor import create_engine

    if os.environ.get("GENSERVE_HANG_DUMP_S"):  # debugging a hang: every thread's stack, later
        faulthandler.dump_traceback_later(float(os.environ["GENSERVE_HANG_DUMP_S"]), repeat=True)

    with tempfile.TemporaryDirectory() as folder:
        write_config(folder, opts.tiny)
        flags = dict(model_id=folder, load_format="dummy", backend=opts.backend, num_shard=opts.num_shard,
                     max_total_tokens=opts.prompt_len + opts.new_tokens + 8,
                     max_input_tokens=opts.prompt_len + 4, max_batch_size=max(opts.concurrency, 1))
        if opts.dtype:
            flags["dtype"] = opts.dtype
        t0 = time.perf_counter()
        loaded = create_engine(defaults(**flags))
        load_s = time.perf_counter() - t0
    print(f"[rank 0] engine built in {load_s:.1f}s", file=sys.stderr, flush=True)
    engine = loaded.engine
    rng = random.Random(0)
    vocab = loaded.model_config.vocab_size

    def prompts(n):
        return [[rng.randrange(10, vocab) for _ in range(opts.prompt_len)] for _ in range(n)]

    decode(engine, prompts(opts.concurrency), 8)  # warm-up: graph capture, allocator, lazy init
    print("[rank 0] warm-up done", file=sys.stderr, flush=True)
    one = decode(engine, prompts(1), opts.new_tokens)
    many = decode(engine, prompts(opts.concurrency), opts.new_tokens)
    result = {
        "num_shard": opts.num_shard, "backend": loaded.backend.name,
        "device": loaded.backend.describe(), "dtype": str(engine.config.dtype), "load_s": round(load_s, 1),
        "prompt_len": opts.prompt_len, "new_tokens": opts.new_tokens, "concurrency": opts.concurrency,
        "tpot_ms_batch1": round(1000 * one["decode_s"] / max(one["decode_tokens"], 1), 3),
        "decode_tok_s": round(many["decode_tokens"] / max(many["decode_s"], 1e-9), 1),
        "e2e_tok_s": round(many["produced"] / many["wall_s"], 1),
        "kv_blocks": engine.blocks.num_blocks,
    }
    print("RESULT " + json.dumps(result), flush=True)  # before teardown, which may be slow
    engine.runner.peers.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="1,2", help="shard counts to compare, e.g. 1,2")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--dtype", default=None, help="default: the backend's (bfloat16 on CUDA)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama instead of the 8B shape")
    ap.add_argument("--json", default=None, help="append one JSON line per shard count to this file")
    ap.add_argument("--num-shard", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    opts = ap.parse_args()

    if opts.num_shard is not None:
        child(opts)
        return

    results = []
    for n in (int(x) for x in opts.shards.split(",")):
        argv = [sys.executable, __file__, "--num-shard", str(n), "--backend", opts.backend,
                "--prompt-len", str(opts.prompt_len), "--new-tokens", str(opts.new_tokens),
                "--concurrency", str(opts.concurrency)] + (["--dtype", opts.dtype] if opts.dtype else []) \
            + (["--tiny"] if opts.tiny else [])
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            sys.exit(f"num_shard={n} failed (exit code {proc.returncode}); its log is above")
        if proc.returncode:  # measured, then failed to tear down: keep the figure, say so
            print(f"num_shard={n}: exit code {proc.returncode} after its result", file=sys.stderr)
        results.append(json.loads(lines[-1][len("RESULT "):]))
        if opts.json:
            with open(opts.json, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")

    base = results[0]
    print(f"\n{'shards':>6} {'TPOT b=1 (ms)':>14} {'decode tok/s':>13} {'e2e tok/s':>10} {'vs first':>9}")
    for r in results:
        print(f"{r['num_shard']:>6} {r['tpot_ms_batch1']:>14.2f} {r['decode_tok_s']:>13.1f} "
              f"{r['e2e_tok_s']:>10.1f} {r['decode_tok_s'] / base['decode_tok_s']:>8.2f}x")
    print(f"device: {base['device']}, dtype {base['dtype']}, prompt {base['prompt_len']}, "
          f"{base['new_tokens']} new tokens, {base['concurrency']} concurrent")


if __name__ == "__main__":
    main()
