"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from genserve.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"
    ABORTED = "aborted"
    ERROR = "error"


@dataclass
class TokenInfo:
    id: int
    logprob: float
    text: str = ""
    special: bool = False
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(eq=False)  # identity semantics: the scheduler looks sequences up in lists
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_tokens: list[TokenInfo] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V is in the cache
    num_cached: int = 0  # of those, how many came from the prefix cache (last admission)
    finish_reason: FinishReason | None = None
    seed: int = 0
    first_scheduled: float | None = None
    first_token_time: float | None = None
    preemptions: int = 0
    admitted_len: int = 0  # its length when last admitted: its cache was computed knowing that many
    error: str | None = None
    # Encoder-decoder models: the client's prompt goes to the encoder and ``prompt_ids`` holds
    # the decoder's start token, so scheduler and KV cache see decoder tokens only. The state
    # comes from the encoder at the first step and lives as long as the request (preemption
    # frees decoder blocks only).
    encoder_ids: list[int] | None = None
    encoder_state: object | None = None
    # Overlapped steps: tokens already sampled on the device whose ids the host has not read
    # yet (they count in ``len`` but not in ``all_ids``), and the newest one's row in the
    # step that sampled it, from which the next step's input is gathered on the device.
    num_pending: int = 0
    pending_row: int = -1
    # Speculative decoding: tokens proposed for this request and, of those, tokens accepted
    # and emitted (TGI's "skipped" tokens: each saved one step).
    spec_proposed: int = 0
    spec_accepted: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        """The prompt as the client sent it."""
        return len(self.encoder_ids if self.encoder_ids is not None else self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids_from(self, start: int) -> list[int]:
        """``all_ids[start:]`` without copying the prompt when ``start`` is past it."""
        n = len(self.prompt_ids)
        return self.output_ids[start - n:] if start >= n else self.prompt_ids[start:] + self.output_ids

    def ids_between(self, start: int, end: int) -> list[int]:
        """``all_ids[start:end]`` without building ``all_ids`` (O(end - start), not O(len))."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def num_known(self) -> int:
        """Tokens whose ids the host holds: ``len(all_ids)`` without building the list."""
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, index: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_generated(self) -> int:
        """Output tokens sampled so far, including those still on the device."""
        return len(self.output_ids) + self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self) - 1 or not self.num_generated and self.num_computed < len(self)
