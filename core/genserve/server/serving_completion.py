"""/v1/completions (vLLM's ``OpenAIServingCompletion``): prompts (text, lists, token ids),
``n`` choices each, ``echo``, and OpenAI's legacy logprobs."""

from __future__ import annotations

import time

from genserve.engine.outputs import RequestOutput
from genserve.server import errors
from genserve.server.inference import SeqResult, finite
from genserve.server.schemas_openai import CompletionRequest
from genserve.server.serving import OpenAIContext, OpenAIServing, RequestTimes, finish_reason, usage
from genserve.server.validation import validate


class CompletionContext(OpenAIContext):
    """A completion request: the echoed prompt text and the text offset of each choice."""

    def __init__(self, serving, req: CompletionRequest, jobs, prompt_tokens: int, times: RequestTimes,
                 echo: list[str]):
        super().__init__(serving, req, jobs, prompt_tokens, times)
        self.echo = echo
        self.offsets = [len(e) for e in echo]


class OpenAIServingCompletion(OpenAIServing):
    id_prefix = "cmpl"
    response_object = chunk_object = "text_completion"

    def prompts(self, prompt) -> list:
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(x, int) for x in prompt):
            prompts = [list(prompt)]
        else:
            prompts = list(prompt)
        if not prompts:
            raise errors.validation("`prompt` cannot be empty")
        limit = self.state.limits.max_client_batch_size
        if len(prompts) > limit:
            raise errors.validation(f"Number of prompts exceeds the maximum allowed batch size of {limit}")
        return prompts

    async def prepare(self, req: CompletionRequest, times: RequestTimes) -> CompletionContext:
        state = self.state
        if req.suffix:
            raise errors.validation("Suffix is not supported and can be achieved by preprocessing the prompt.")
        n = self.choices_count(req.n)
        prompts = self.prompts(req.prompt)
        p = self.gen_params(req, req.max_tokens if req.max_tokens is not None else 100)
        if req.logprobs is not None:
            p.top_n_tokens = req.logprobs
        valids = [await validate(state, x, p) for x in prompts]
        times.validated = time.monotonic()
        for v in valids:
            state.record_validated(v)
        jobs = [(v.prompt_ids, params) for v in valids for params in self.seeded(v, n)]
        echo = [v.inputs if req.echo else "" for v in valids for _ in range(n)]
        return CompletionContext(self, req, jobs, sum(v.input_length for v in valids), times, echo)

    def logprobs(self, tokens, offset: int, top: int) -> dict:
        state = self.state
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            out["tokens"].append(t.text)
            out["token_logprobs"].append(finite(t.logprob))
            out["top_logprobs"].append({state.token_text(i): lp for i, lp in t.top[:top] if finite(lp) is not None})
            out["text_offset"].append(offset)
            offset += len(t.text)
        return out

    def response(self, ctx: CompletionContext, results: list[SeqResult]) -> dict:
        req, echo = ctx.req, ctx.echo
        choices = [{"index": i, "text": echo[i] + r.text, "finish_reason": finish_reason(r.finish_reason),
                    "logprobs": self.logprobs(r.tokens, len(echo[i]), req.logprobs)
                    if req.logprobs is not None else None} for i, r in enumerate(results)]
        generated = sum(len(r.tokens) for r in results)
        return {**ctx.header(self.response_object), "choices": choices,
                "usage": usage(ctx.prompt_tokens, generated)}

    @staticmethod
    def chunk(i: int, text: str, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {"choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

    def first_chunks(self, ctx: CompletionContext) -> list[dict]:
        return [self.chunk(i, e) for i, e in enumerate(ctx.echo) if e]

    def chunks(self, ctx: CompletionContext, i: int, out: RequestOutput) -> list[dict]:
        req = ctx.req
        lp = None
        if req.logprobs is not None:
            lp = self.logprobs(out.tokens, ctx.offsets[i], req.logprobs)
        ctx.offsets[i] += len(out.text)
        reason = finish_reason(out.finish_reason) if out.finished else None
        if out.text or reason or lp:
            return [self.chunk(i, out.text, reason, lp)]
        return []
