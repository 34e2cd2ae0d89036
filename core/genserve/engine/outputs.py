"""What the engine reports for a request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from genserve.engine.sequence import FinishReason, TokenInfo


@dataclass
class PromptToken:
    id: int
    text: str
    logprob: float | None


@dataclass
class RequestOutput:
    request_id: str
    tokens: list[TokenInfo] = field(default_factory=list)  # new tokens since the last output
    text: str = ""  # new text since the last output (valid UTF-8, stop text included)
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated: int = 0
    seed: int | None = None
    prompt_tokens: list[PromptToken] | None = None  # once, with the first output, when asked
    error: str | None = None
    # A stop string ended the request (finish_reason STOP): how many characters at the end of
    # the text it covers (TGI's routes return them, the OpenAI routes trim them).
    stop_chars: int = 0
    # Speculative decoding, over the request so far: tokens proposed, and those accepted (emitted
    # without a step of their own). Both 0 when speculation is off.
    spec_proposed: int = 0
    spec_accepted: int = 0
    # Timestamps (time.monotonic) for metrics.
    arrival: float = 0.0
    first_scheduled: float | None = None
