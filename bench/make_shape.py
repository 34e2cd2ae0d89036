"""Write a config-only checkpoint directory of a known shape (for ``--load-format dummy`` runs).

    python bench/make_shape.py DIR [--shape llama3-8b|llama3.2-1b]

The directory holds ``config.json`` only; the benches give it a synthetic tokenizer where they
need text (``bench/load_test.py``).
"""

from __future__ import annotations

import argparse

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    args = ap.parse_args()
    from transformers import LlamaConfig

    LlamaConfig(**SHAPES[args.shape], torch_dtype="bfloat16").save_pretrained(args.dir)


if __name__ == "__main__":
    main()
