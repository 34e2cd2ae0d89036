"""Streamed tool calls as OpenAI sends them: a first tool-call chunk with id, type and name (empty
arguments), then pieces of the arguments text, then ``finish_reason: "tool_calls"``. The pieces
add up to exactly the non-streamed ``arguments`` for the same seed."""

from __future__ import annotations

import json
import random

import openai
import pytest

from genserve.server.chat import parse_tool_output
from genserve.server.tool_stream import ToolCallReader
from serverkit import sse_events

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]},
                                                    "note": {"type": "string", "maxLength": 12}},
                   "required": ["city", "unit", "note"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


# -- the reader alone -----------------------------------------------------------------------
TEXTS = [
    '{"name":"get_weather","arguments":{"city":"Rome","note":"a}\\"b\\u00e9 \\ud83d\\ude00"}}',
    '{"name": "get_time", "arguments": {"zone": "UTC"}}',  # spaces between the tokens
    '{"name":"f","arguments":{"a":[1,{"b":"}"}],"n":-1.5e3}}',
    '{"name":"f","arguments":12}',
    '{"name":"no_tool","content":"a\\\\b\\"c \\u00e9 \\ud83d\\ude00 end"}',
    '{"name":"get_time","arguments":{"zone":"U',  # cut short by max_tokens
    '{"name":"no_tool","content":"ab\\u00',
    '{"name":"get_ti',
    "not a tool call",
]


def read_in_pieces(text: str, rng: random.Random) -> tuple[list[str], str, str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    reader, names, arguments, content = ToolCallReader(), [], "", ""
    for k, piece in enumerate(pieces):
        d = reader.feed(piece, final=k == len(pieces) - 1)
        names += [d.name] if d.name else []
        arguments, content = arguments + d.arguments, content + d.content
    return names, arguments, content


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_reading(text):
    content, calls = parse_tool_output(text)
    rng = random.Random(text)
    for _ in range(200):
        names, arguments, streamed = read_in_pieces(text, rng)
        if calls:
            assert names == [calls[0]["function"]["name"]] and streamed == ""
            assert arguments == calls[0]["function"]["arguments"]
        else:
            assert names == [] and arguments == "" and streamed == content


def test_whole_readings():
    assert parse_tool_output(TEXTS[0])[1][0]["function"]["arguments"] == \
        '{"city":"Rome","note":"a}\\"b\\u00e9 \\ud83d\\ude00"}'
    assert parse_tool_output(TEXTS[1])[1][0]["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert parse_tool_output(TEXTS[4]) == ('a\\b"c é 😀 end', None)
    assert parse_tool_output(TEXTS[5])[1][0]["function"]["arguments"] == '{"zone":"U'
    assert parse_tool_output(TEXTS[7]) == (TEXTS[7], None)
    assert parse_tool_output(TEXTS[8]) == (TEXTS[8], None)


# -- through the server -----------------------------------------------------------------------
def chat(tiny, stream: bool, **kw):
    body = {"messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 80, "temperature": 1.0, **kw}
    if not stream:
        r = tiny.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()
    with tiny.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return sse_events(r)


def streamed_choice(events: list, index: int = 0) -> tuple[list[dict], str, str | None]:
    """(the tool-call entries of the deltas, the content, the finish reason) of one choice."""
    calls, content, reason = [], "", None
    for e in events[:-1]:
        for c in e["choices"]:
            if c["index"] == index:
                calls += c["delta"].get("tool_calls") or []
                content += c["delta"].get("content") or ""
                reason = c["finish_reason"] or reason
    return calls, content, reason


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", "auto", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_matches_the_answer(tiny, choice):
    seen = set()
    for seed in range(6):
        answer = chat(tiny, False, tool_choice=choice, seed=seed)["choices"][0]
        events = chat(tiny, True, tool_choice=choice, seed=seed)
        assert events[-1] == "[DONE]"
        calls, content, reason = streamed_choice(events)
        assert reason == answer["finish_reason"]
        if answer["message"]["tool_calls"] is None:  # auto chose a plain answer: streamed as content
            assert choice == "auto" and calls == [] and content == answer["message"]["content"]
            seen.add("content")
            continue
        expected = answer["message"]["tool_calls"][0]["function"]
        head, pieces = calls[0], calls[1:]
        assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
        assert head["function"] == {"name": expected["name"], "arguments": ""}
        assert all(set(p) == {"index", "function"} and p["index"] == 0 and set(p["function"]) == {"arguments"}
                   for p in pieces)
        assert len(pieces) > 1  # the arguments come as they are generated, not in one piece
        arguments = "".join(p["function"]["arguments"] for p in pieces)
        assert arguments == expected["arguments"]
        if reason == "tool_calls":
            assert isinstance(json.loads(arguments), dict)
            seen.add("call")
        if isinstance(choice, dict):
            assert expected["name"] == "get_weather"
    assert "call" in seen


@pytest.mark.slow
def test_cut_short_tool_call_says_length(tiny):
    """max_tokens ends the call mid-way: "length", and the same partial arguments either way."""
    partial = []
    for max_tokens in range(6, 30, 3):
        answer = chat(tiny, False, tool_choice="required", seed=1, max_tokens=max_tokens)["choices"][0]
        calls, content, reason = streamed_choice(chat(tiny, True, tool_choice="required", seed=1,
                                                      max_tokens=max_tokens))
        assert answer["finish_reason"] == reason == "length"
        if answer["message"]["tool_calls"] is None:  # cut before the name was complete
            assert calls == [] and content == answer["message"]["content"]
            continue
        arguments = answer["message"]["tool_calls"][0]["function"]["arguments"]
        assert "".join(c["function"]["arguments"] for c in calls) == arguments
        partial.append(arguments)
    assert any(partial)


@pytest.mark.slow
def test_each_choice_streams_its_own_call(tiny):
    events = chat(tiny, True, tool_choice="required", seed=4, n=2)
    for i in (0, 1):
        calls, _, reason = streamed_choice(events, i)
        assert reason == "tool_calls" and len([c for c in calls if "id" in c]) == 1
        json.loads("".join(c["function"]["arguments"] for c in calls))


@pytest.mark.slow
def test_openai_stream_helper_assembles_the_call(tiny_server, tiny):
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
    kw = {"model": "tgi", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required",
          "max_tokens": 80, "temperature": 1.0, "seed": 2}
    with client.chat.completions.stream(**kw) as stream:
        kinds = {e.type for e in stream}
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.delta" in kinds and "tool_calls.function.arguments.done" in kinds
    expected = chat(tiny, False, tool_choice="required", seed=2)["choices"][0]["message"]["tool_calls"][0]
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, call.function.arguments) == (expected["function"]["name"],
                                                             expected["function"]["arguments"])
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
