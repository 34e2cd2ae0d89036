"""Per-request generation settings, already validated by the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genserve.multimodal.inputs import MultiModalInputs


@dataclass
class SamplingParams:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: the engine draws one and reports it
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    top_n_tokens: int = 0
    prompt_logprobs: bool = False  # TGI's decoder_input_details
    watermark: bool = False
    # A genserve.engine.constraints.Constraint (one per sequence: it holds the grammar state).
    constraint: Any = None
    adapter_id: str | None = None
    # The prompt's images (vision-language models), prepared by the model's processor. They
    # travel with the request's settings, as the adapter does, so every (prompt ids, params)
    # job of the server and the offline API carries them unchanged.
    multimodal: MultiModalInputs | None = None

    @property
    def needs_sorting(self) -> bool:
        return self.do_sample and (self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0)
