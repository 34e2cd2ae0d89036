"""Mixtral-8x7B shape (bf16, random weights) on one GPU: does a decode step read only the routed
experts? (issue 17, "Mixture of experts").

    python bench/gpu_mixtral.py [--skip-hf] [--tiny] [--backend cuda] [--out DIR]

Figures (rows in ``DIR/<gpu>.jsonl``, metric names with ``_mixtral``):
- ``tpot_b1_ms_mixtral``: time per output token of one request (128-token prompt, 257 new);
- ``decode_tok_s_64x32x512_mixtral`` / ``decode_tok_s_128x32x512_mixtral``: output tok/s with 64
  and 128 requests of 32 prompt tokens and 512 new tokens submitted at once;
- ``tpot_b1_ms_mixtral`` from ``roofline``: the bytes a batch-1 step must read (attention and
  router weights, two experts per layer, the LM head) over the measured copy bandwidth, and
  ``all_experts`` in that row: the time to read every expert (what the dense fallback reads);
- transformers (``AutoModelForCausalLM.from_config``, same shape, bf16) on the same GPU after
  genserve has released it: batch-1 time per token over 64 tokens (slow: its MoE loops over
  experts), unless ``--skip-hf``.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_llama8b import Recorder, build_genserve, copy_bandwidth, random_prompt, run_requests  # noqa: E402

MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2,
                    tie_word_embeddings=False)
TINY = dict(MIXTRAL_8X7B, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def step_bytes(c) -> tuple[int, int]:
    """(bytes a batch-1 decode step must read, bytes of all experts) in bf16."""
    h, i, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    attn = L * (h * (h + 2 * kv) + h * h)
    expert = 3 * h * i
    router = L * h * c.num_local_experts
    need = 2 * (attn + router + L * c.num_experts_per_tok * expert + V * h)
    return need, 2 * L * c.num_local_experts * expert


def genserve_figures(engine, rec, vocab, rng):
    run_requests(engine, [random_prompt(rng, 128, vocab)], [16])  # warm-up of this shape
    _, _, _, times = run_requests(engine, [random_prompt(rng, 128, vocab)], [257])
    t = next(iter(times.values()))
    rec("tpot_b1_ms_mixtral", (t[-1] - t[0]) / (len(t) - 1) * 1e3, "ms", "genserve")
    for batch in (64, 128):
        wall, produced, _, _ = run_requests(engine, [random_prompt(rng, 32, vocab) for _ in range(batch)],
                                            [512] * batch)
        rec(f"decode_tok_s_{batch}x32x512_mixtral", produced / wall, "tok/s", "genserve")


def transformers_figures(config, rec, vocab, rng):
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()

    def gen(n_out):
        ids = torch.tensor([random_prompt(rng, 128, vocab)], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out,
                           min_new_tokens=n_out, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(2)
    short, long = gen(2), gen(66)
    rec("tpot_b1_ms_mixtral", (long - short) / 64 * 1e3, "ms", "transformers")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--cuda-graphs", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--max-batch-size", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    from transformers import MixtralConfig

    config = MixtralConfig(**(TINY if args.tiny else MIXTRAL_8X7B))
    model_dir = tempfile.mkdtemp(prefix="genserve-bench-mixtral-")
    config.save_pretrained(model_dir)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rec = Recorder(gpu + ("-tiny" if args.tiny else ""), args.out)
    rng = random.Random(0)
    print(f"device {gpu}, torch {torch.__version__}, commit {rec.meta['commit']}", flush=True)
    if torch.cuda.is_available():
        bw = copy_bandwidth()
        need, experts = step_bytes(config)
        rec("tpot_b1_ms_mixtral", need / bw * 1e3, "ms", "roofline", step_gb=round(need / 1e9, 2),
            all_experts_ms=round(experts / bw * 1e3, 2), copy_gb_s=round(bw / 1e9, 1))
    engine = build_genserve(model_dir, args)
    moe = engine.runner.model.layers[0].mlp  # Mixtral's block_sparse_moe sits where the MLP does
    print(f"experts implementation: {moe.fused_experts.impl_name}", flush=True)
    genserve_figures(engine, rec, config.vocab_size, rng)
    del engine, moe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        if not args.skip_hf:
            transformers_figures(config, rec, config.vocab_size, rng)
    print("\nsummary (jsonl at %s)" % rec.path)
    for r in rec.rows:
        print(f"  {r['engine']:13s} {r['metric']:34s} {r['value']:>12} {r['unit']}")


if __name__ == "__main__":
    sys.exit(main())
