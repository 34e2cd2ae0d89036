"""Where a batch-1 decode step of the embedded SmolLM2 spends its time: torch profiler (self CPU
time per op, and per op and input shape) over ``--new-tokens`` greedy steps after the chat prompt
of ``bench/cpu_smollm2.py``. docs/benchmarks.md ("Where the packed path spends a decode step").

    python bench/cpu_gguf_profile.py [--quantize gguf] [--dtype float32] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from cpu_smollm2 import PROMPT, genserve_run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", default="gguf")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    from genserve.args import defaults
    from genserve.engine.build import build_engine

    t0 = time.perf_counter()
    loaded = build_engine(defaults(dtype=args.dtype, quantize=None if args.quantize == "none" else args.quantize))
    print(f"load {time.perf_counter() - t0:.1f} s, load average {os.getloadavg()}")
    tok, engine = loaded.tokenizer, loaded.engine
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    engine.blocks.enable_prefix_caching = False
    genserve_run(engine, [prompt], 8)  # warm-up
    tps, _ = genserve_run(engine, [prompt], 64)
    print(f"batch 1: {tps:.1f} tok/s unprofiled ({len(prompt)}-token prompt)")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        genserve_run(engine, [prompt], args.new_tokens)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30,
                                                              max_name_column_width=40, max_shapes_column_width=90))
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
