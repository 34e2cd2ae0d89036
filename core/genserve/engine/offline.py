"""Running requests on a built engine until they finish: the add-requests-and-step loop.

``iter_steps`` is the loop itself (vLLM's ``LLM._run_engine``): it submits each request before
the step it joins at, steps the engine until nothing waits or runs, and yields every step's
outputs, so a caller can time steps, abort a request or start a profiler between them.
``run_to_completion`` folds those per-step deltas into one ``GenerationOutput`` per request,
in the order the requests were given. ``genserve.LLM.generate``, the warm-up, the tests and
the benchmarks all drive the engine through here.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from genserve.engine.outputs import PromptToken, RequestOutput
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.sequence import FinishReason, TokenInfo

_REQUEST_IDS = itertools.count()


def _next_request_id() -> str:
    return f"offline-{next(_REQUEST_IDS)}"


@dataclass
class OfflineRequest:
    """One request for ``iter_steps``/``run_to_completion``.

    ``prompt_token_ids``: the prompt (for encoder-decoder models, the encoder's input).
    ``join_step``: the request is added just before the engine's step of this index (0: before
    the first), so later requests join a batch that is already decoding.
    ``request_id``: unique among the engine's live requests; a fresh one when not given.
    ``prompt``: the prompt's text, when it had one (reported back, not tokenized here).
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    join_step: int = 0
    request_id: str = field(default_factory=_next_request_id)
    prompt: str | None = None


@dataclass
class CompletionOutput:
    """The generated sequence of a request (vLLM's ``CompletionOutput``).

    ``tokens`` holds every generated token with its text, log-probability (natural log) and,
    with ``top_n_tokens``, its top alternatives. ``finish_reason`` is TGI's (``length``,
    ``eos_token``, ``stop_sequence``; ``aborted``/``error`` with ``error`` set for the latter),
    None while unfinished.
    """

    index: int = 0
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    seed: int | None = None  # the seed sampling used (None for greedy)
    error: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def logprobs(self) -> list[float]:
        """The log-probability of each generated token (genserve always computes it)."""
        return [t.logprob for t in self.tokens]

    @property
    def cumulative_logprob(self) -> float:
        return sum(self.logprobs)

    @property
    def top_logprobs(self) -> list[list[tuple[int, float]]]:
        """Per token, the ``top_n_tokens`` most likely (id, logprob); empty lists without it."""
        return [list(t.top) for t in self.tokens]


@dataclass
class GenerationOutput:
    """Everything a finished request produced (the fields of vLLM's ``RequestOutput``).

    ``prompt_tokens`` is set when the request asked for ``prompt_logprobs``.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_tokens: list[PromptToken] | None = None

    @property
    def prompt_logprobs(self) -> list[float | None] | None:
        """Per prompt token, its log-probability given the tokens before it (None for the
        first); None unless the request asked for ``prompt_logprobs``."""
        if self.prompt_tokens is None:
            return None
        return [t.logprob for t in self.prompt_tokens]


class OutputCollector:
    """Folds the engine's per-step deltas (``RequestOutput``) into one ``GenerationOutput``
    per request. Outputs of request ids it was not given raise ``KeyError``."""

    def __init__(self, requests: Sequence[OfflineRequest]):
        self._results = {r.request_id: GenerationOutput(r.request_id, r.prompt, list(r.prompt_token_ids),
                                                        [CompletionOutput()]) for r in requests}
        if len(self._results) != len(requests):
            raise ValueError("request ids must be unique")
        self._order = [r.request_id for r in requests]

    def add(self, outputs: Sequence[RequestOutput]) -> int:
        """Take one step's outputs; returns how many requests they finished."""
        finished = 0
        for out in outputs:
            result = self._results[out.request_id]
            completion = result.outputs[0]
            completion.tokens += out.tokens
            completion.text += out.text
            completion.seed = out.seed
            if out.prompt_tokens is not None:
                result.prompt_tokens = out.prompt_tokens
            if out.finished:
                result.finished = True
                completion.finish_reason, completion.error = out.finish_reason, out.error
                finished += 1
        return finished

    def results(self) -> list[GenerationOutput]:
        """One output per request, in the order the requests were given."""
        return [self._results[rid] for rid in self._order]


def iter_steps(engine, requests: Sequence[OfflineRequest]) -> Iterator[list[RequestOutput]]:
    """Add each request before the step it joins at and step ``engine`` (an ``LLMEngine``)
    until no request waits to join and the engine has no work; yield each step's outputs
    (possibly empty: every step is yielded, so callers can count and time them).

    The loop steps whatever the engine holds: requests added before it run (and are yielded)
    too. Requests it added that are still live when the iteration stops early (the caller
    breaks out and the generator is closed, or a step raises) are aborted, so the engine is
    left clean. Not for an engine an ``AsyncEngine`` is stepping. Raises what
    ``engine.add_request`` raises (``ValueError`` for a duplicate id or an empty prompt).
    """
    pending = deque(sorted(requests, key=lambda r: r.join_step))  # stable: ties keep their order
    added: list[str] = []
    step = 0
    drained = False
    try:
        while pending or engine.has_work:
            while pending and pending[0].join_step <= step:
                r = pending.popleft()
                engine.add_request(r.request_id, r.prompt_token_ids, r.params)
                added.append(r.request_id)
            yield engine.step()
            step += 1
        drained = True
    finally:
        if not drained:
            for rid in added:
                if rid in engine.seqs:
                    engine.abort(rid)


def run_to_completion(engine, requests: Sequence[OfflineRequest]) -> list[GenerationOutput]:
    """Run ``requests`` on ``engine`` until all finish; one ``GenerationOutput`` per request, in
    the given order. Errors as ``iter_steps``; ``ValueError`` for duplicate request ids."""
    collector = OutputCollector(requests)
    for outputs in iter_steps(engine, requests):
        collector.add(outputs)
    return collector.results()
