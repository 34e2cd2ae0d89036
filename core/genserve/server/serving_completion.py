"""/v1/completions (vLLM's ``OpenAIServingCompletion``): prompts (text, lists, token ids),
``n`` choices each, ``echo``, and OpenAI's legacy logprobs."""

from __future__ import annotations

import codecs
import time

from genserve.engine.outputs import RequestOutput
from genserve.server import errors
from genserve.server.inference import SeqResult, finite
from genserve.server.schemas_openai import CompletionRequest
from genserve.server.serving import (
    OpenAIContext,
    OpenAIServing,
    RequestTimes,
    finish_reason,
    token_string,
    usage,
    without_stop,
)
from genserve.server.validation import validate


class CompletionContext(OpenAIContext):
    """A completion request: ``best_of`` sequences per prompt (``n`` of them returned), the
    echoed prompt text and the text offset of each sequence."""

    def __init__(self, serving, req: CompletionRequest, jobs, prompt_tokens: int, times: RequestTimes,
                 echo: list[str], n: int, best_of: int):
        super().__init__(serving, req, jobs, prompt_tokens, times)
        self.echo, self.n, self.best_of = echo, n, best_of
        self.offsets = [len(e) for e in echo]
        # Prompt logprobs: with echo, OpenAI lists the prompt's tokens before the completion's.
        self.prompt_logprobs = bool(req.echo) and req.logprobs is not None


class OpenAIServingCompletion(OpenAIServing[CompletionContext]):
    id_prefix = "cmpl"
    response_object = chunk_object = "text_completion"

    def prompts(self, prompt) -> list:
        prompts: list
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
        best_of = self.best_of(req, n)
        prompts = self.prompts(req.prompt)
        p = self.gen_params(req, req.max_tokens if req.max_tokens is not None else 100)
        if req.logprobs is not None:
            p.top_n_tokens = req.logprobs
        valids = [await validate(state, x, p) for x in prompts]
        times.validated = time.monotonic()
        for v in valids:
            state.record_validated(v)
        jobs = [(v.prompt_ids, params) for v in valids for params in self.seeded(v, best_of)]
        ctx = CompletionContext(self, req, jobs, sum(v.input_length for v in valids), times,
                                [v.inputs if req.echo else "" for v in valids for _ in range(best_of)],
                                n, best_of)
        for _, params in jobs:
            params.prompt_logprobs = ctx.prompt_logprobs
        return ctx

    def best_of(self, req: CompletionRequest, n: int) -> int:
        """OpenAI's ``best_of``: sequences generated per prompt, of which the ``n`` with the
        highest log-probability sum are returned (not streamable unless equal to ``n``)."""
        if req.best_of is None or req.best_of == n:
            return n
        limit = max(self.state.limits.max_best_of, n)
        if not n <= req.best_of <= limit:
            raise errors.validation(f"`best_of` must be >= `n` ({n}) and <= {limit}. Given: {req.best_of}")
        if req.stream:
            raise errors.validation("`best_of` != `n` is not supported when streaming tokens")
        return req.best_of

    def logprobs(self, tokens, offset: int, top: int, prompt: list | None = None) -> dict:
        """OpenAI's legacy logprobs of generated ``tokens`` whose text starts at ``offset``,
        after the echoed ``prompt`` tokens (PromptTokens; the first has no logprob) if given.
        Tokens are shown by their own bytes (serving.token_string); offsets index the text."""
        state = self.state
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if prompt:
            text = codecs.getincrementaldecoder("utf-8")(errors="replace")
            at = 0
            for k, t in enumerate(prompt):
                raw = state.token_bytes(t.id)
                lp = finite(t.logprob) if k else None
                out["tokens"].append(token_string(raw))
                out["token_logprobs"].append(lp)
                out["top_logprobs"].append(None if lp is None else {token_string(raw): lp})
                out["text_offset"].append(at)
                if not state.is_special(t.id):
                    at += len(text.decode(raw))
        for t in tokens:
            out["tokens"].append(token_string(state.token_bytes(t.id)))
            out["token_logprobs"].append(finite(t.logprob))
            out["top_logprobs"].append({token_string(state.token_bytes(i)): lp
                                        for i, lp in t.top[:top] if finite(lp) is not None})
            out["text_offset"].append(offset)
            offset += len(t.text)
        return out

    def best(self, ctx: CompletionContext, results: list[SeqResult]) -> list[int]:
        """Indices of the returned sequences: per prompt, the ``n`` of its ``best_of`` with the
        highest log-probability sum (all of them, in order, when best_of == n)."""
        if ctx.best_of == ctx.n:
            return list(range(len(results)))
        chosen = []
        for first in range(0, len(results), ctx.best_of):
            group = range(first, first + ctx.best_of)
            chosen += sorted(group, key=lambda k: -results[k].logprob_sum)[:ctx.n]
        return chosen

    def response(self, ctx: CompletionContext, results: list[SeqResult]) -> dict:
        req, echo = ctx.req, ctx.echo
        choices = []
        for index, i in enumerate(self.best(ctx, results)):
            r = results[i]
            choices.append({
                "index": index, "text": echo[i] + without_stop(r.text, r.finish_reason, r.stop_chars),
                "finish_reason": finish_reason(r.finish_reason),
                "logprobs": self.logprobs(r.tokens, len(echo[i]), req.logprobs,
                                          r.prompt_tokens if ctx.prompt_logprobs else None)
                if req.logprobs is not None else None})
        generated = sum(len(r.tokens) for r in results)
        return {**ctx.header(self.response_object), "choices": choices,
                "usage": usage(ctx.prompt_tokens, generated)}

    @staticmethod
    def chunk(i: int, text: str, reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {"choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

    def first_chunks(self, ctx: CompletionContext) -> list[dict]:
        if ctx.prompt_logprobs:  # the echo goes with the prompt's logprobs, in the first output
            return []
        return [self.chunk(i, e) for i, e in enumerate(ctx.echo) if e]

    def chunks(self, ctx: CompletionContext, i: int, out: RequestOutput) -> list[dict]:
        req = ctx.req
        lp = None
        echo = ctx.echo[i] if ctx.prompt_logprobs and out.prompt_tokens is not None else ""
        if req.logprobs is not None:
            lp = self.logprobs(out.tokens, ctx.offsets[i], req.logprobs, out.prompt_tokens if echo else None)
        ctx.offsets[i] += len(out.text)
        text = echo + ctx.held[i].feed(out)
        reason = finish_reason(out.finish_reason) if out.finished else None
        if text or reason or lp:
            return [self.chunk(i, text, reason, lp)]
        return []
