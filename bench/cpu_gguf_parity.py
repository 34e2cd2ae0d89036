"""Greedy parity of the embedded SmolLM2 served packed (``--quantize gguf``) against transformers
fp32 on the same GGUF dequantized: per chat prompt, the first generated token where they differ.

    python bench/cpu_gguf_parity.py [--new-tokens 64] [--quantize gguf] [--dtype float32]

Prints one line per prompt and the count that match in full (docs/quantization.md, "GGUF on the
CPU"). transformers' ``generate`` is the reference, as in tests/engine/test_embedded_model.py.
"""

from __future__ import annotations

import argparse

import torch

PROMPTS = ["Tell me a joke.", "Write a haiku about the sea.", "Summarize the plot of Romeo and Juliet.",
           "What is the capital of France?", "Explain gravity in one sentence.",
           "List three uses of a paperclip.", "How do I boil an egg?", "Translate 'good morning' into Spanish."]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quantize", default="gguf")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    from genserve.args import defaults
    from genserve.engine.build import build_engine
    from genserve.testing import generate_greedy, reference_greedy
    from transformers import AutoModelForCausalLM

    loaded = build_engine(defaults(backend="cpu", dtype=args.dtype,
                                   quantize=None if args.quantize == "none" else args.quantize))
    tok, engine, src = loaded.tokenizer, loaded.engine, loaded.source
    engine.blocks.enable_prefix_caching = False
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for t in PROMPTS]
    ours = [generate_greedy(engine, [p], args.new_tokens)[0] for p in prompts]
    del engine
    hf = AutoModelForCausalLM.from_pretrained(str(src.path), gguf_file=src.gguf_file, dtype=torch.float32).eval()
    same = 0
    for text, p, mine in zip(PROMPTS, prompts, ours):
        out = reference_greedy(hf, p, args.new_tokens)
        first = next((i for i, (a, b) in enumerate(zip(mine, out)) if a != b), None)
        same += first is None
        print(f"{text!r}: " + ("identical" if first is None else f"differs from token {first}"), flush=True)
    print(f"{same}/{len(PROMPTS)} prompts identical over {args.new_tokens} greedy tokens "
          f"(--quantize {args.quantize}, --dtype {args.dtype})")


if __name__ == "__main__":
    main()
