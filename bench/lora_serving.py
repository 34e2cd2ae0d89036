"""Issue-20 benchmark: multi-LoRA serving on the Llama-3-8B shape, bf16, random weights.

One run measures, with random rank-16 adapters on q/k/v/o/gate/up/down:

- ``tpot_b1_ms_base``: batch-1 time per token of an engine without LoRA;
- ``tpot_b1_ms_lora_none`` / ``tpot_b1_ms_lora_1``: the LoRA engine, a request without an
  adapter / with one (goal: with one <= 1.15x the base);
- ``tok_s_64x64_base`` / ``tok_s_64x64_lora``: 64 concurrent requests, without LoRA / each with
  its own of 64 adapters (goal: >= 0.75x);
- ``tok_s_256_over_500``: 256 concurrent requests over 500 adapters with 64 device slots, with
  the slot loads (misses) it needed, and ``slot_miss_ms``: one adapter's host -> slot copy.

The 500 adapter ids share their host weights in a pool of ``--adapter-pool`` random adapters
(500 distinct rank-16 adapters of this shape would hold 42 GB of pinned host memory); every id
still has its own slot and is copied into it on each miss, so slot traffic is what 500
distinct adapters cost. Adapters are registered in memory (``LoRAManager.register``) after the
same validation as a file-loaded adapter (``prepare_adapter``). Each figure is printed and
appended to ``bench/results/<gpu>.jsonl`` as ``gpu_llama8b.py`` does.

    python bench/lora_serving.py                    # the issue's figures, on one GPU
    python bench/lora_serving.py --tiny --backend cpu   # a small model, to check the script
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_llama8b import LLAMA3_8B, TINY, Recorder, random_prompt

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build(model_dir: str, args, lora: bool):
    from genserve.args import defaults
    from genserve.engine.build import build_engine
    from genserve.engine.warmup import warm_up

    flags = {"model_id": model_dir, "load_format": "dummy", "backend": args.backend,
                 "dtype": "float32" if args.backend == "cpu" else "bfloat16",
                 "max_batch_prefill_tokens": args.prefill_chunk, "max_batch_size": args.max_batch_size,
                 "cuda_memory_fraction": 0.92}
    if args.cuda_graphs is not None and args.backend != "cpu":
        flags["cuda_graphs"] = args.cuda_graphs
    if lora:  # no startup adapter: slots on every linear layer, adapters registered below
        flags.update(enable_lora_runtime_updates=True, lora_modules_dir=tempfile.mkdtemp(),
                     max_loras=args.max_loras, max_lora_rank=args.rank)
    loaded = build_engine(defaults(**flags))
    warm_up(loaded.engine, loaded.model_config.vocab_size)
    runner = loaded.engine.runner
    graphs = "n/a"
    if loaded.backend.name == "cuda":
        graphs = f"off ({runner.graphs_off})" if runner.graphs_off else "on"
    print(f"engine: backend {loaded.backend.name}, attention {loaded.attention}, LoRA method "
          f"{runner.lora.method.name if runner.lora else None}, decode graphs {graphs}, "
          f"load {loaded.load_seconds:.1f}s", flush=True)
    return loaded


def register_adapters(loaded, n: int, pool: int, rank: int, seed: int = 0) -> list[str]:
    """``n`` adapter ids over ``pool`` random rank-``rank`` PEFT adapters (validated and sharded
    like file-loaded ones), all registered on the host."""
    from genserve.lora.manager import HostAdapter
    from genserve.lora.peft_format import LoRAModule, PeftAdapter

    manager, cfg = loaded.engine.runner.lora, loaded.model_config
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    g = torch.Generator().manual_seed(seed)
    hosts = []
    for p in range(pool):
        peft = PeftAdapter(f"pool-{p}", Path("/dev/null"), rank, 2.0 * rank)
        for layer in range(cfg.num_hidden_layers):
            for t in TARGETS:
                part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                fan_in, fan_out = shapes[t]
                peft.modules[f"model.layers.{layer}.{part}.{t}"] = LoRAModule(
                    torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5,
                    torch.randn(fan_out, rank, generator=g) * 0.01, 2.0)
        hosts.append(manager.prepare_adapter(peft))
    ids = [f"adapter-{i}" for i in range(n)]
    for i, aid in enumerate(ids):
        host = hosts[i % pool]
        manager.register(HostAdapter(aid, -1, host.path, host.rank, host.layers))
    return ids


def run(engine, prompts, out_lens, adapters):
    """Everything submitted at once; (wall seconds, output tokens, per-request token times)."""
    from genserve.engine.offline import OfflineRequest, iter_steps
    from genserve.engine.sampling_params import SamplingParams

    engine.blocks.reset_prefix_cache()
    gc.collect()
    t0 = time.perf_counter()
    requests = [OfflineRequest(p, SamplingParams(max_new_tokens=n, ignore_eos=True, adapter_id=a),
                               request_id=f"r{t0}-{i}")
                for i, (p, n, a) in enumerate(zip(prompts, out_lens, adapters))]
    times: dict[str, list[float]] = {r.request_id: [] for r in requests}
    produced = 0
    for outs in iter_steps(engine, requests):
        now = time.perf_counter()
        for out in outs:
            produced += len(out.tokens)
            times[out.request_id].extend([now] * len(out.tokens))
    return time.perf_counter() - t0, produced, times


def tpot_ms(engine, rng, vocab, adapter, new_tokens):
    run(engine, [random_prompt(rng, 128, vocab)], [16], [adapter])  # warm-up of this path
    _, _, times = run(engine, [random_prompt(rng, 128, vocab)], [new_tokens], [adapter])
    t = next(iter(times.values()))
    return (t[-1] - t[0]) / (len(t) - 1) * 1e3


def throughput(engine, rng, vocab, adapters, new_tokens):
    prompts = [random_prompt(rng, 128, vocab) for _ in adapters]
    run(engine, prompts[:2], [8, 8], adapters[:2])  # warm-up
    wall, produced, _ = run(engine, prompts, [new_tokens] * len(adapters), adapters)
    return produced / wall


def slot_miss_ms(loaded, ids, samples=20):
    """Median time to copy one non-resident adapter into a slot (evicting the LRU one)."""
    manager, backend = loaded.engine.runner.lora, loaded.backend
    cold = [a for a in ids if manager.table.slot_of(a) is None][:samples]
    times = []
    for aid in cold:
        step = manager.batch_for([aid], [1])
        backend.synchronize()
        t0 = time.perf_counter()
        manager.load_slots(step)
        backend.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) if times else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=500)
    ap.add_argument("--adapter-pool", type=int, default=8, help="distinct host weights behind the ids")
    ap.add_argument("--max-loras", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=None, help="per request (default 256; 32 with --tiny)")
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--cuda-graphs", default="1,2,4,8,16,32,64,128,192,256")
    ap.add_argument("--skip-base", action="store_true", help="no engine without LoRA")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    new_tokens = args.new_tokens or (32 if args.tiny else 256)

    from transformers import LlamaConfig

    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    model_dir = tempfile.mkdtemp(prefix="genserve-bench-lora-")
    config.save_pretrained(model_dir)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and args.backend != "cpu" else "cpu"
    rec = Recorder(gpu + ("-tiny" if args.tiny else ""), args.out)
    vocab = config.vocab_size
    rng = random.Random(0)
    print(f"device {gpu}, torch {torch.__version__}, commit {rec.meta['commit']}", flush=True)

    base = {}
    if not args.skip_base:
        loaded = build(model_dir, args, lora=False)
        base["tpot"] = tpot_ms(loaded.engine, rng, vocab, None, 257)
        rec("tpot_b1_ms_base", base["tpot"], "ms", "genserve")
        base["tok_s"] = throughput(loaded.engine, rng, vocab, [None] * 64, new_tokens)
        rec("tok_s_64x64_base", base["tok_s"], "tok/s", "genserve", new_tokens=new_tokens)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    loaded = build(model_dir, args, lora=True)
    engine, manager = loaded.engine, loaded.engine.runner.lora
    t0 = time.perf_counter()
    ids = register_adapters(loaded, args.adapters, args.adapter_pool, args.rank)
    print(f"registered {len(ids)} adapters ({args.adapter_pool} distinct) in {time.perf_counter() - t0:.1f}s",
          flush=True)

    none = tpot_ms(engine, rng, vocab, None, 257)
    rec("tpot_b1_ms_lora_none", none, "ms", "genserve")
    one = tpot_ms(engine, rng, vocab, ids[0], 257)
    rec("tpot_b1_ms_lora_1", one, "ms", "genserve",
        **({"vs_base": round(one / base["tpot"], 3)} if base else {}))

    distinct = ids[:64]
    tok_s = throughput(engine, rng, vocab, distinct, new_tokens)
    rec("tok_s_64x64_lora", tok_s, "tok/s", "genserve", new_tokens=new_tokens,
        **({"vs_base": round(tok_s / base["tok_s"], 3)} if base else {}))

    choice = random.Random(1)
    mixed = [choice.choice(ids) for _ in range(256)]
    loads0 = manager.table.loads
    prompts = [random_prompt(rng, 128, vocab) for _ in mixed]
    wall, produced, _ = run(engine, prompts, [new_tokens] * len(mixed), mixed)
    rec("tok_s_256_over_500", produced / wall, "tok/s", "genserve", new_tokens=new_tokens,
        adapters=args.adapters, slots=args.max_loras, distinct_requested=len(set(mixed)),
        slot_loads=manager.table.loads - loads0)
    rec("slot_miss_ms", slot_miss_ms(loaded, ids), "ms", "genserve", rank=args.rank)
    print(f"\nsummary (jsonl at {rec.path})")
    for r in rec.rows:
        print(f"  {r['metric']:24s} {r['value']:>12} {r['unit']}")


if __name__ == "__main__":
    sys.exit(main())
