"""End to end on the embedded SmolLM2-135M-Instruct: answers, EOS, tools and JSON on a real model."""

from __future__ import annotations

import json

import openai
import pytest
from huggingface_hub import InferenceClient

pytestmark = pytest.mark.slow
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def oai(smol_server):
    return openai.OpenAI(base_url=smol_server.url + "/v1", api_key="unused", max_retries=0)


def test_capital_of_france(oai):
    r = oai.chat.completions.create(model="tgi", messages=FRANCE, max_tokens=30, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # the model ended its turn (EOS)
    assert r.usage.completion_tokens < 30


def test_capital_of_france_streamed_through_the_hub_client(smol_server):
    client = InferenceClient(smol_server.url)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat_completion(
        FRANCE, max_tokens=30, temperature=0, stream=True))
    assert "Paris" in text


def test_tgi_generate_stops_on_eos(smol_server):
    import httpx

    templated = httpx.post(smol_server.url + "/chat_tokenize", json={"messages": FRANCE}).json()["templated_text"]
    r = httpx.post(smol_server.url + "/generate", json={"inputs": templated, "parameters": {
        "max_new_tokens": 40, "details": True}}, timeout=120).json()
    assert "Paris" in r["generated_text"] and r["details"]["finish_reason"] == "eos_token"
    assert r["details"]["tokens"][-1]["special"] is True  # <|im_end|>, not in the text
    assert "<|im_end|>" not in r["generated_text"]


def test_tool_call(oai):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                       "required": ["city"], "additionalProperties": False}}}]
    r = oai.chat.completions.create(model="tgi", messages=[{"role": "user", "content": "What's the weather in Paris?"}],
                                    tools=tools, tool_choice="required", max_tokens=40, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_json_response_format(oai):
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    r = oai.chat.completions.create(
        model="tgi", messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert "Paris" in json.loads(r.choices[0].message.content)["capital"]
