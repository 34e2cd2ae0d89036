"""End to end on the real SmolLM2-135M-Instruct: greedy parity with transformers, streaming text."""

import asyncio

import pytest
import torch

from genserve.engine.async_engine import AsyncEngine
from genserve.engine.detokenizer import Detokenizer
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from tests.conftest import chat_ids

PROMPTS = ["What is the capital of France?", "Explain photosynthesis to a child.",
           "List three uses of Python."]


def run(engine, prompts, **params):
    results = run_to_completion(engine, [OfflineRequest(p, SamplingParams(**params)) for p in prompts])
    return [r.outputs[0].token_ids for r in results], [r.outputs[0].text for r in results]


def test_answers_the_france_question(smollm2):
    _, texts = run(smollm2.engine, [chat_ids(smollm2.tokenizer, PROMPTS[0])], max_new_tokens=30)
    assert texts[0] == "The capital of France is Paris."


def test_greedy_tokens_equal_transformers_batched(smollm2):
    from transformers import AutoModelForCausalLM

    prompts = [chat_ids(smollm2.tokenizer, p) for p in PROMPTS]
    ours, _ = run(smollm2.engine, prompts, max_new_tokens=32)
    src = smollm2.source
    hf = AutoModelForCausalLM.from_pretrained(str(src.path), gguf_file=src.gguf_file,
                                              dtype=torch.float32).eval()
    for p, mine in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0, len(p):].tolist()
        assert mine == ref


def test_seeded_sampling_is_reproducible(smollm2):
    p = chat_ids(smollm2.tokenizer, "Tell me a joke.")
    params = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.9, seed=42)
    first, _ = run(smollm2.engine, [p], **params)
    again, _ = run(smollm2.engine, [p, chat_ids(smollm2.tokenizer, "Hi"), p[:5]], **params)
    assert first[0] == again[0]


def test_stop_sequence_cuts_after_the_stop_text(smollm2):
    p = chat_ids(smollm2.tokenizer, PROMPTS[0])
    _, texts = run(smollm2.engine, [p], max_new_tokens=30, stop=["France"])
    assert texts[0] == "The capital of France"


def test_streamed_text_is_valid_utf8_for_multibyte_characters(smollm2):
    tok = smollm2.tokenizer
    text = "Café — 東京 🚀 naïve ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tok)
    state = detok.start([])
    pieces = [detok.step(state, ids[: i + 1]) for i in range(len(ids))]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_abandoned_stream_frees_its_blocks(smollm2):
    engine = smollm2.engine
    aengine = AsyncEngine(engine)
    aengine.start()
    try:
        async def consume_two():
            gen = aengine.generate("abandon", chat_ids(smollm2.tokenizer, "Count to one hundred."),
                                   SamplingParams(max_new_tokens=500, ignore_eos=True))
            got = 0
            async for _ in gen:
                got += 1
                if got == 2:
                    break
            await gen.aclose()
            for _ in range(100):  # the abort lands within a step or two
                if engine.blocks.num_used == 0 and not engine.has_work:
                    return True
                await asyncio.sleep(0.05)
            return False

        assert asyncio.run(consume_two())
    finally:
        aengine.shutdown()


def test_async_generate_streams_until_finished(smollm2):
    aengine = AsyncEngine(smollm2.engine)
    aengine.start()
    try:
        async def collect():
            outs = []
            async for out in aengine.generate("stream", chat_ids(smollm2.tokenizer, PROMPTS[0]),
                                              SamplingParams(max_new_tokens=30)):
                outs.append(out)
            return outs

        outs = asyncio.run(collect())
        assert outs[-1].finished and outs[-1].finish_reason.value == "eos_token"
        assert "".join(o.text for o in outs) == "The capital of France is Paris."
    finally:
        aengine.shutdown()


@pytest.mark.parametrize("n", [4])
def test_concurrent_requests_all_finish(smollm2, n):
    prompts = [chat_ids(smollm2.tokenizer, f"Say the number {i}.") for i in range(n)]
    tokens, _ = run(smollm2.engine, prompts, max_new_tokens=8, ignore_eos=True)
    assert all(len(t) == 8 for t in tokens)
    assert smollm2.engine.blocks.num_used == 0
