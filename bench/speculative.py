"""Speculative decoding (issue 14): what a verify step costs, what that implies, and n-gram /
draft-model / Medusa / EAGLE runs against no speculation.

    python bench/speculative.py --tiny       # tiny random models, CPU: checks the script
    python bench/speculative.py --smollm2    # CPU, embedded SmolLM2, n-gram on a rewrite task
    python bench/speculative.py              # GPU: Llama-3-8B shape target, Llama-3.2-1B shape draft,
                                             # bf16 random weights (--load-format dummy)

Figures (printed, and appended to bench/results/<device>.jsonl like the other benches):
  - ``step_decode_ms``: a batch-1 decode step without speculation (CUDA graphs as configured);
  - ``step_verify_k{K}_ms``: a batch-1 verify step of K + 1 tokens (a proposer that always offers
    K tokens, which random weights reject: every step verifies K + 1 rows), and its ratio to the
    decode step (the issue asks <= 1.15 at K = 4);
  - ``draft_token_ms``: one draft-model step at batch 1 (Llama-3.2-1B shape on GPU);
  - ``medusa_step_cost_ms`` / ``eagle_step_cost_ms``: what Medusa heads (K heads) and an EAGLE-1
    draft (one target-shaped layer) add to a batch-1 verify step (proposing, plus taking the
    step's hidden states), and the speed-ups implied with them;
  - ``implied_speedup_*``: decode-step cost over the cost per emitted token when each proposal is
    accepted with probability a (a = 0.6, 0.8): E[tokens per verify step] = (1 - a^(K+1)) / (1 - a)
    (Leviathan et al. 2023, Eq. 1), cost per verify step = verify + K x draft (n-gram: draft = 0);
  - ``tok_s_*``: end-to-end output tokens/s (batch 1 and 8) with speculation off, n-gram and draft,
    and the measured acceptance rate.
Random weights make acceptance meaningless: the n-gram runs use a repetitive prompt set (a random
chunk repeated), and whatever the random target then emits decides acceptance. Real speed-ups
depend on real weights and real prompts; the step costs and the implied figures are what random
weights can tell.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_llama8b import LLAMA3_8B, Recorder  # noqa: E402

LLAMA32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
TINY_DRAFT = dict(TINY, num_hidden_layers=1)
PASSAGE = ("The city council met on Tuesday to discuss the new park. The new park will have a playground, "
           "a pond and a small library. Residents asked for more trees and benches near the pond. The "
           "council will vote on the new park next month, after a public hearing at the library.")


def save_config(params: dict) -> str:
    from transformers import LlamaConfig

    folder = tempfile.mkdtemp(prefix="genserve-spec-bench-")
    LlamaConfig(**params).save_pretrained(folder)
    return folder


def build(args, model_dir: str | None, **flags):
    from genserve.args import defaults
    from genserve.engine.build import build_engine
    from genserve.engine.warmup import warm_up

    base = dict(backend=args.backend, dtype=args.dtype, max_batch_total_tokens=args.kv_tokens)
    if model_dir is not None:
        base.update(model_id=model_dir, load_format="dummy")
    loaded = build_engine(defaults(**base, **flags))
    warm_up(loaded.engine, loaded.model_config.vocab_size)
    return loaded


class AlwaysPropose:
    """A proposer offering K tokens that random weights reject: every step verifies K + 1 rows."""

    name = "bench-always"

    def __init__(self, vocab: int):
        self.rng, self.vocab = random.Random(0), vocab

    def propose(self, requests):
        return [[self.rng.randrange(self.vocab) for _ in range(r.k)] for r in requests]

    needs_hidden_states = False

    def forget(self, request_id):
        pass


class Timed:
    """Wraps a proposer; ``seconds`` collects the wall time of each ``propose`` call and
    ``observe_seconds`` that of each ``observe`` (EAGLE runs its draft over a step's accepted
    rows there; Medusa keeps the last row)."""

    def __init__(self, inner):
        self.inner, self.name, self.seconds, self.observe_seconds = inner, inner.name, [], []
        self.needs_hidden_states = inner.needs_hidden_states

    def propose(self, requests):
        t0 = time.perf_counter()
        out = self.inner.propose(requests)  # draft tokens are read on the host: synchronised
        self.seconds.append(time.perf_counter() - t0)
        return out

    def observe(self, rows):
        t0 = time.perf_counter()
        self.inner.observe(rows)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the draft's forward is queued, not finished
        self.observe_seconds.append(time.perf_counter() - t0)

    def forget(self, request_id):
        self.inner.forget(request_id)


def use_proposer(engine, proposer, k: int) -> None:
    from genserve.spec_decode.config import SpeculativeConfig
    from genserve.spec_decode.speculator import Speculator

    engine.speculator = Speculator(proposer, SpeculativeConfig(k, proposer.name, max_batch_size=1 << 20))
    engine.overlap = False


def run(engine, prompts, new_tokens: int):
    """All prompts at once, greedy, ignore_eos. Returns (tokens/s, decode step durations, acceptance)."""
    from genserve.engine.offline import OfflineRequest, iter_steps
    from genserve.engine.sampling_params import SamplingParams

    engine.blocks.reset_prefix_cache()
    spec = engine.speculator
    p0, a0 = (spec.num_proposed, spec.num_accepted) if spec else (0, 0)
    requests = [OfflineRequest(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                               request_id=f"bench-{time.perf_counter()}-{i}") for i, p in enumerate(prompts)]
    steps, produced = [], 0
    t0 = time.perf_counter()
    for outputs in iter_steps(engine, requests):
        produced += sum(len(o.tokens) for o in outputs)
        if not engine.last_step_stats.get("is_prefill"):
            steps.append(engine.last_step_stats["duration"])
    wall = time.perf_counter() - t0
    accept = None
    if spec and spec.num_proposed > p0:
        accept = (spec.num_accepted - a0) / (spec.num_proposed - p0)
    return produced / wall, steps, accept


def expected_tokens(a: float, k: int) -> float:
    return (1 - a ** (k + 1)) / (1 - a)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny random models (any device)")
    ap.add_argument("--smollm2", action="store_true", help="the embedded SmolLM2 on CPU, n-gram only")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("-k", "--speculate", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--kv-tokens", type=int, default=65536)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not (args.tiny or args.smollm2)
    args.backend = args.backend or ("cuda" if gpu else "cpu")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    new_tokens = args.new_tokens or (128 if gpu else 32)
    k = args.speculate
    device = torch.cuda.get_device_name() if gpu else "cpu"
    rec = Recorder(device + ("-tiny" if args.tiny else "-smollm2" if args.smollm2 else ""), args.out)
    rng = random.Random(0)

    if args.smollm2:
        target_dir, draft_dir = None, None
        loaded = build(args, None)
        tok = loaded.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": f"Rewrite this passage, keeping its "
                                         f"facts and order: {PASSAGE}"}], add_generation_prompt=True,
                                       tokenize=False)
        repetitive = [tok(text, add_special_tokens=False)["input_ids"]]
    else:
        target_dir = save_config(TINY if args.tiny else LLAMA3_8B)
        draft_dir = save_config(TINY_DRAFT if args.tiny else LLAMA32_1B)
        loaded = build(args, target_dir)
        vocab = loaded.model_config.vocab_size
        chunk = [rng.randrange(100, vocab - 1) for _ in range(32)]
        repetitive = [chunk * (args.prompt_len // 32)]
    engine, vocab = loaded.engine, loaded.model_config.vocab_size
    random_prompt = [[rng.randrange(100, vocab - 1) for _ in range(args.prompt_len)]]

    # 1. Step costs at batch 1.
    _, decode_steps, _ = run(engine, random_prompt, new_tokens)
    decode = statistics.median(decode_steps)
    rec("step_decode_ms", decode * 1e3, "ms", "genserve")
    use_proposer(engine, AlwaysPropose(vocab), k)
    _, verify_steps, _ = run(engine, random_prompt, new_tokens)
    verify = statistics.median(verify_steps)
    rec(f"step_verify_k{k}_ms", verify * 1e3, "ms", "genserve")
    rec(f"verify_k{k}_over_decode", verify / decode, "x", "genserve", target="<= 1.15")
    for a in (0.6, 0.8):
        rec(f"implied_speedup_ngram_a{a}", decode * expected_tokens(a, k) / verify, "x", "genserve")
    engine.speculator, engine.overlap = None, engine.runner.overlap_steps

    # 2. End to end: no speculation vs n-gram (and a draft model) on the repetitive prompts.
    for batch in (1, 8):
        prompts = repetitive * batch
        tps, _, _ = run(engine, prompts, new_tokens)
        rec(f"tok_s_off_b{batch}", tps, "tok/s", "genserve")
    from genserve.spec_decode.ngram import NgramProposer

    use_proposer(engine, NgramProposer(), k)
    for batch in (1, 8):
        tps, _, accept = run(engine, repetitive * batch, new_tokens)
        rec(f"tok_s_ngram_k{k}_b{batch}", tps, "tok/s", "genserve", acceptance=accept)
    if draft_dir is not None:
        del engine, loaded
        gc.collect()  # the target without a draft goes before the one with it loads
        if gpu:
            torch.cuda.empty_cache()
        loaded = build(args, target_dir, speculative_model=draft_dir, speculate=k,
                       speculative_max_batch_size=1 << 20)
        engine = loaded.engine
        timed = Timed(engine.speculator.proposer)
        engine.speculator.proposer = timed
        _, _, _ = run(engine, random_prompt, 8)  # the draft's first proposal prefills it
        timed.seconds.clear()
        tps, steps, accept = run(engine, random_prompt, new_tokens)
        draft = statistics.median(timed.seconds[1:]) / k  # [0]: the draft's prefill of the prompt
        rec("draft_token_ms", draft * 1e3, "ms", "genserve")
        rec(f"step_draft_verify_k{k}_ms", statistics.median(steps) * 1e3, "ms", "genserve")
        for a in (0.6, 0.8):
            rec(f"implied_speedup_draft_a{a}", decode * expected_tokens(a, k) / (verify + k * draft),
                "x", "genserve")
        rec(f"tok_s_draft_k{k}_b1", tps, "tok/s", "genserve", acceptance=accept,
            note="random weights: acceptance meaningless")
    if target_dir is not None:
        del engine, loaded
        heads_runs(args, target_dir, k, decode, verify, rec, random_prompt, new_tokens, gpu)


def heads_runs(args, target_dir: str, k: int, decode: float, verify: float, rec, random_prompt,
               new_tokens: int, gpu: bool) -> None:
    """Medusa (k heads of one ResBlock ending in the target's LM head: TGI's MedusaHeadV2
    layout, whose cost equals k own LM heads) and EAGLE-1 (one Llama layer), random weights:
    their cost per verify step (proposing plus taking the step's hidden states) and the
    speed-ups those imply."""
    from transformers import LlamaConfig

    from genserve.spec_decode.testing import random_medusa_heads, save_eagle, save_medusa_heads

    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    heads_dir = Path(tempfile.mkdtemp(prefix="genserve-spec-bench-medusa-"))
    save_medusa_heads(heads_dir, random_medusa_heads(k, 1, config.hidden_size, config.vocab_size, lm_heads=False),
                      k, 1, base_model=Path(target_dir))
    eagle_dir = Path(tempfile.mkdtemp(prefix="genserve-spec-bench-eagle-"))
    save_eagle(eagle_dir, config)
    runs = (("medusa", heads_dir, {}),
            ("eagle", target_dir, dict(speculative_model=str(eagle_dir), speculative_method="eagle")))
    for name, model_dir, flags in runs:
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        loaded = build(args, str(model_dir), speculate=k, speculative_max_batch_size=1 << 20, **flags)
        engine = loaded.engine
        timed = Timed(engine.speculator.proposer)
        engine.speculator.proposer = timed
        run(engine, random_prompt, 8)
        timed.seconds.clear()
        timed.observe_seconds.clear()
        tps, steps, accept = run(engine, random_prompt, new_tokens)
        cost = statistics.median(timed.seconds) + statistics.median(timed.observe_seconds[1:])  # [0]: prefill
        rec(f"{name}_step_cost_ms", cost * 1e3, "ms", "genserve", note="propose + observe per verify step")
        rec(f"step_{name}_verify_k{k}_ms", statistics.median(steps) * 1e3, "ms", "genserve")
        for a in (0.6, 0.8):
            rec(f"implied_speedup_{name}_a{a}", decode * expected_tokens(a, k) / (verify + cost), "x", "genserve")
        rec(f"tok_s_{name}_k{k}_b1", tps, "tok/s", "genserve", acceptance=accept,
            note="random weights: acceptance meaningless")
        del engine, loaded


if __name__ == "__main__":
    main()
