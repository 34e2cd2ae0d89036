"""/v1/chat/completions (vLLM's ``OpenAIServingChat``): the chat template, tools and
response formats as grammars, and OpenAI's chat answer, whole or streamed."""

from __future__ import annotations

from genserve.engine.outputs import RequestOutput
from genserve.engine.sequence import FinishReason
from genserve.server.chat import parse_tool_output, render_chat, response_format_grammar, tool_schema
from genserve.server.inference import SeqResult, finite
from genserve.server.schemas_openai import ChatRequest
from genserve.server.serving import (
    BAD_LOGPROB,
    OpenAIContext,
    OpenAIServing,
    RequestTimes,
    finish_reason,
    token_string,
    usage,
    without_stop,
)
from genserve.server.tool_stream import ToolCallReader, ToolDelta, new_call_id
from genserve.server.validation import validate


def chat_finish_reason(reason: FinishReason | None, tool_call: bool) -> str:
    # A tool call cut short by max_tokens says "length", as OpenAI does: its arguments are partial.
    return "tool_calls" if tool_call and reason is not FinishReason.LENGTH else finish_reason(reason)


def delta(content=None, tool_calls=None) -> dict:
    # role and tool_calls in every delta: the text-generation client requires both keys
    return {"role": "assistant", "content": content, "tool_calls": tool_calls}


def tool_deltas(d: ToolDelta, call_id: str) -> list[dict]:
    """OpenAI's streamed tool call: id, type and name first (empty arguments), then only pieces
    of the arguments text, all under tool call index 0."""
    out = []
    if d.name is not None:
        out.append(delta(None, [{"index": 0, "id": call_id, "type": "function",
                                 "function": {"name": d.name, "arguments": ""}}]))
    if d.arguments:
        out.append(delta(None, [{"index": 0, "function": {"arguments": d.arguments}}]))
    if d.content:
        out.append(delta(d.content))
    return out


class ChatContext(OpenAIContext):
    """A chat request: whether it calls tools, and each choice's tool-call reader."""

    def __init__(self, serving, req: ChatRequest, jobs, prompt_tokens: int, times: RequestTimes,
                 tools: bool):
        super().__init__(serving, req, jobs, prompt_tokens, times)
        self.tools = tools
        self.readers = [ToolCallReader() for _ in jobs] if tools else []
        self.call_ids = [new_call_id() for _ in self.readers]


class OpenAIServingChat(OpenAIServing[ChatContext]):
    id_prefix = "chatcmpl"
    response_object, chunk_object = "chat.completion", "chat.completion.chunk"

    async def prepare(self, req: ChatRequest, times: RequestTimes) -> ChatContext:
        state = self.state
        n = self.choices_count(req.n)
        p = self.gen_params(req, req.max_completion_tokens or req.max_tokens)
        if req.logprobs:
            p.top_n_tokens = req.top_logprobs or 0
        schema = tool_schema(req.tools, req.tool_choice)
        if schema is not None:
            p.grammar = ("json_schema", schema)
        else:
            p.grammar = response_format_grammar(req.response_format)
        prompt, images = render_chat(state, req.messages, req.tools if schema is not None else None,
                                     req.tool_prompt)
        valid = await validate(state, prompt, p, add_special_tokens=False, images=images)
        times.validated = state.record_validated(valid)
        jobs = [(valid.prompt_ids, params) for params in self.seeded(valid, n)]
        return ChatContext(self, req, jobs, valid.input_length, times, schema is not None)

    def logprobs(self, tokens) -> dict:
        content = []
        for t in tokens:
            if t.special:
                continue
            top = [self.logprob_entry(i, lp) for i, lp in t.top if finite(lp) is not None]
            content.append({**self.logprob_entry(t.id, t.logprob), "top_logprobs": top})
        return {"content": content}

    def logprob_entry(self, token_id: int, logprob: float) -> dict:
        """OpenAI's ``{token, logprob, bytes}``: the token's own bytes, even when they are only
        part of a character (OpenAI: "characters represented by multiple tokens")."""
        raw = self.state.token_bytes(token_id)
        lp = finite(logprob)
        return {"token": token_string(raw), "logprob": BAD_LOGPROB if lp is None else lp, "bytes": list(raw)}

    def response(self, ctx: ChatContext, results: list[SeqResult]) -> dict:
        req = ctx.req
        choices = []
        for i, r in enumerate(results):
            text = without_stop(r.text, r.finish_reason, r.stop_chars)
            content, calls = parse_tool_output(text) if ctx.tools else (text, None)
            choices.append({"index": i, "message": {"role": "assistant", "content": content, "tool_calls": calls},
                            "logprobs": self.logprobs(r.tokens) if req.logprobs else None,
                            "finish_reason": chat_finish_reason(r.finish_reason, bool(calls))})
        completion = sum(len(r.tokens) for r in results)
        return {**ctx.header(self.response_object), "choices": choices,
                "usage": usage(ctx.prompt_tokens, completion)}

    @staticmethod
    def chunk(i: int, d: dict, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {"choices": [{"index": i, "delta": d, "logprobs": logprobs, "finish_reason": reason}]}

    def first_chunks(self, ctx: ChatContext) -> list[dict]:
        return [self.chunk(i, delta("")) for i in range(len(ctx.jobs))]

    def chunks(self, ctx: ChatContext, i: int, out: RequestOutput) -> list[dict]:
        req, chunks = ctx.req, []
        text = ctx.held[i].feed(out)
        if ctx.tools:
            for d in tool_deltas(ctx.readers[i].feed(text, final=out.finished), ctx.call_ids[i]):
                chunks.append(self.chunk(i, d))
        elif text or (req.logprobs and out.tokens and not out.finished):
            lp = self.logprobs(out.tokens) if req.logprobs else None
            chunks.append(self.chunk(i, delta(text), logprobs=lp))
        if out.finished:
            reason = chat_finish_reason(out.finish_reason, ctx.tools and ctx.readers[i].is_call)
            chunks.append(self.chunk(i, {"role": "assistant", "content": None, "tool_calls": None}, reason))
        return chunks
