"""Is the offline figure stable within one process? Runs the offline workload of
gpu_llama8b.py several times on one engine (optionally after a long decode run), printing
tok/s and steps each time. ``python bench/offline_repeat.py [--decode-first]``"""

import argparse
import gc
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_llama8b as b  # noqa: E402


def offline(engine, vocab):
    rng = random.Random(0)
    lens_in = [min(2000, max(4, int(rng.lognormvariate(4.95, 1.0)))) for _ in range(1000)]
    lens_out = [min(1500, max(4, int(rng.lognormvariate(5.25, 0.8)))) for _ in range(1000)]
    prompts = [b.random_prompt(rng, n, vocab) for n in lens_in]
    wall, produced, _, _ = b.run_requests(engine, prompts, lens_out)
    return produced / wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-first", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=512)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--cuda-graphs", default="1,2,4,8,16,32,64,128,192,256,320,384,448,512")
    args = ap.parse_args()
    from transformers import LlamaConfig
    folder = tempfile.mkdtemp()
    LlamaConfig(**b.LLAMA3_8B).save_pretrained(folder)
    ns = argparse.Namespace(backend="cuda", prefill_chunk=args.prefill_chunk, max_batch_size=args.max_batch_size,
                            cuda_graphs=args.cuda_graphs)
    print(f"max batch {args.max_batch_size}, prefill chunk {args.prefill_chunk}", flush=True)
    engine = b.build_genserve(folder, ns)
    vocab = 128256
    if args.decode_first:
        t0 = time.perf_counter()
        rng = random.Random(1)
        b.run_requests(engine, [b.random_prompt(rng, 32, vocab) for _ in range(128)], [2048] * 128)
        print(f"decode 128x2048 took {time.perf_counter() - t0:.1f}s", flush=True)
    for i in range(args.repeats):
        tok_s = offline(engine, vocab)
        print(f"offline run {i}: {tok_s:8.1f} tok/s, steps {b.STEPS}, "
              f"preemptions {engine.scheduler.num_preemptions}", flush=True)
    gc.collect()
    gc.freeze()
    print(f"after gc.freeze: {offline(engine, vocab):8.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
