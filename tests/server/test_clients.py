"""The clients people point at TGI: huggingface_hub's InferenceClient and the text-generation package."""

from __future__ import annotations

import asyncio

import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HubValidationError

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture()
def text_generation():
    return pytest.importorskip("text_generation", reason="pip install --no-deps text-generation")
HI = [{"role": "user", "content": "Say hi"}]


@pytest.fixture()
def hub(tiny_server):
    return InferenceClient(tiny_server.url)


def test_hub_text_generation(hub, tiny):
    ref = tiny.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 6}}).json()
    assert hub.text_generation("Hello", max_new_tokens=6) == ref["generated_text"]
    out = hub.text_generation("Hello", max_new_tokens=6, details=True, decoder_input_details=True, top_n_tokens=2)
    assert out.generated_text == ref["generated_text"] and out.details.finish_reason == "length"
    assert out.details.generated_tokens == 6 and len(out.details.prefill) > 0
    assert len(out.details.top_tokens) == 6


def test_hub_text_generation_stream(hub, tiny):
    ref = tiny.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 6}}).json()
    pieces = list(hub.text_generation("Hello", max_new_tokens=6, stream=True))
    assert len(pieces) == 6
    events = list(hub.text_generation("Hello", max_new_tokens=6, stream=True, details=True))
    assert events[-1].generated_text == ref["generated_text"]
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 6


def test_hub_chat_completion(hub):
    out = hub.chat_completion(HI, max_tokens=5, temperature=0)
    text = "".join(c.choices[0].delta.content or "" for c in hub.chat_completion(HI, max_tokens=5, temperature=0,
                                                                                   stream=True))
    assert out.choices[0].message.content == text and out.usage.completion_tokens == 5


def test_hub_errors(hub):
    with pytest.raises(HubValidationError, match="`temperature` must be strictly positive"):
        hub.text_generation("Hello", max_new_tokens=3, temperature=-1)
    with pytest.raises(HubValidationError, match="`top_p`"):
        list(hub.text_generation("Hello", max_new_tokens=3, top_p=1.0, stream=True))


def test_text_generation_client(text_generation, tiny_server, tiny):
    client = text_generation.Client(tiny_server.url)
    ref = tiny.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 6}}).json()
    r = client.generate("Hello", max_new_tokens=6)
    assert r.generated_text == ref["generated_text"] and r.details.generated_tokens == 6
    best = client.generate("Hello", max_new_tokens=4, best_of=2, do_sample=True)
    assert len(best.details.best_of_sequences) == 1
    stream = list(client.generate_stream("Hello", max_new_tokens=6))
    assert stream[-1].generated_text == ref["generated_text"]
    assert stream[-1].details.finish_reason == text_generation.types.FinishReason.Length
    chat = client.chat(messages=[text_generation.types.Message(role="user", content="Say hi")], max_tokens=4)
    assert chat.choices[0].finish_reason == "length" and chat.usage["completion_tokens"] == 4
    with pytest.raises(text_generation.errors.ValidationError):
        client.generate("Hello", max_new_tokens=100_000)
    with pytest.raises(text_generation.errors.ValidationError):
        list(client.generate_stream("Hello", max_new_tokens=100_000))


def test_text_generation_chat_stream(text_generation, tiny_server):
    """The client parses every chunk; it trips over the final `data: [DONE]` as it does with TGI."""
    client = text_generation.Client(tiny_server.url)
    chunks = []
    with pytest.raises(ValueError):  # json.JSONDecodeError on "[DONE]"
        for chunk in client.chat(messages=[text_generation.types.Message(role="user", content="hi")],
                                 max_tokens=3, stream=True):
            chunks.append(chunk)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_text_generation_async_client(text_generation, tiny_server, tiny):
    ref = tiny.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}}).json()

    async def run():
        client = text_generation.AsyncClient(tiny_server.url)
        results = await asyncio.gather(*[client.generate("Hello", max_new_tokens=5) for _ in range(4)])
        events = [e async for e in client.generate_stream("Hello", max_new_tokens=5)]
        chat = await client.chat(messages=[text_generation.types.Message(role="user", content="hi")], max_tokens=3)
        return results, events, chat

    results, events, chat = asyncio.run(run())
    assert all(r.generated_text == ref["generated_text"] for r in results)
    assert events[-1].generated_text == ref["generated_text"] and len(events) == 5
    assert chat.choices[0].message.role == "assistant"
