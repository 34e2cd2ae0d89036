"""Speculative decoding of grammar-constrained requests (issue 14), CPU, embedded SmolLM2:

    python bench/speculative_grammar.py [-k 4] [--repeat 3]

A JSON-Schema request that copies a record from its prompt (an input-grounded task, where n-gram
proposals are right), decoded greedily with speculation off and with n-gram speculation. Prints
the tokens (asserted identical), accepted / proposed proposals, wall time and tokens/s of each
(the best of ``--repeat`` runs), and the host cost of the grammar's part of a verify step: one
mask, the k + 1 masks of a verify row (``fill_verify_bitmask``), and the cut of k proposals
(``speculative_prefix``), averaged over the positions of the record.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from genserve.args import defaults
from genserve.engine.build import build_engine
from genserve.engine.constraints import bitmask_words, fill_verify_bitmask, speculative_prefix
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from genserve.server.grammar import GrammarCompiler

RECORD = {"name": "Ada Lovelace", "born": 1815, "field": "mathematics",
          "known_for": ["the Analytical Engine", "the first program"]}
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "born": {"type": "integer"}, "field": {"type": "string"},
                         "known_for": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "born", "field", "known_for"], "additionalProperties": False}


def micro_us(fn, n: int = 20) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", "--speculate", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    flags = dict(backend="cpu", dtype="float32", max_batch_total_tokens=8192, max_total_tokens=2048)
    off = build_engine(defaults(**flags))
    on = build_engine(defaults(speculate=args.speculate, **flags)).engine
    tok, vocab = off.tokenizer, off.engine.runner.vocab_size
    grammars = GrammarCompiler(tok, vocab, set(off.engine.eos_token_ids))
    if (why := grammars.check()) is not None:
        raise SystemExit(f"grammars do not work with this tokenizer: {why}")
    text = json.dumps(RECORD, separators=(",", ":"))
    prompt = tok.apply_chat_template([{"role": "user", "content": f"Copy this JSON record exactly, as compact JSON: {text}"}],
                                     add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]

    def run(engine):
        best, out = float("inf"), None
        for _ in range(args.repeat):
            params = SamplingParams(max_new_tokens=80, constraint=grammars.compile("json", SCHEMA)())
            t = time.perf_counter()
            out = run_to_completion(engine, [OfflineRequest(prompt_ids, params)])[0].outputs[0]
            best = min(best, time.perf_counter() - t)
        return out, best

    want, t_off = run(off.engine)
    got, t_on = run(on)
    assert got.token_ids == want.token_ids, "speculation changed the tokens"
    n = len(got.token_ids)
    spec = on.speculator
    print(f"output: {got.text}  ({n} tokens, {got.finish_reason})")
    print(f"n-gram k={args.speculate}: accepted {spec.num_accepted} of {spec.num_proposed} proposals "
          f"(over {args.repeat} run(s))")
    print(f"wall time: off {t_off:.2f} s ({n / t_off:.2f} tok/s), n-gram {t_on:.2f} s ({n / t_on:.2f} tok/s)")

    ids = tok(text, add_special_tokens=False)["input_ids"]
    k = args.speculate
    c = grammars.compile("json", SCHEMA)()
    bitmask = torch.full((k + 1, bitmask_words(vocab)), -1, dtype=torch.int32)
    one = rows = cut = 0.0
    positions = len(ids) - k
    for i in range(positions):
        one += micro_us(lambda: c.fill_bitmask(bitmask, 0))
        rows += micro_us(lambda: fill_verify_bitmask(c, bitmask, 0, ids[i:i + k]))
        cut += micro_us(lambda: speculative_prefix(c, ids[i:i + k]))
        c.advance(ids[i])
    print(f"grammar host cost (vocab {vocab}, mean of {positions} positions): one mask {one / positions:.0f} us, "
          f"{k + 1} verify-row masks {rows / positions:.0f} us, cut of {k} proposals {cut / positions:.0f} us")


if __name__ == "__main__":
    main()
