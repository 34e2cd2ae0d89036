"""TGI's request validation (router/src/validation.rs): same rules, order and messages.

Routes turn their bodies into ``GenParams``; ``validate`` checks them, tokenizes the prompt
and compiles the grammar, and returns a ``ValidRequest`` that makes the engine's
``SamplingParams`` for each sequence.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from genserve.engine.sampling_params import SamplingParams
from genserve.server import tracing
from genserve.server.errors import validation
from genserve.server.vision import image_prompt

DEFAULT_GENERATION_LENGTH = 1024
U64_MAX = 2**64 - 1
INLINE_TOKENIZE_CHARS = 4096  # longer prompts are tokenized on a validation worker
# The longest a request waits for its grammar (llguidance's own fuel limits bound the work; a
# grammar that takes longer is refused rather than holding a validation worker's queue).
GRAMMAR_COMPILE_TIMEOUT_S = 30.0


@dataclass
class GenParams:
    """TGI's GenerateParameters after parsing, plus OpenAI's presence_penalty."""

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    grammar: tuple[str, Any] | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool = False
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None

    @classmethod
    def from_tgi(cls, p) -> "GenParams":
        if p is None:
            return cls()
        g = p.grammar
        return cls(
            best_of=p.best_of, decoder_input_details=bool(p.decoder_input_details),
            details=bool(p.details), do_sample=bool(p.do_sample),
            frequency_penalty=p.frequency_penalty,
            grammar=(g.type, g.value) if g is not None else None,
            max_new_tokens=p.max_new_tokens, repetition_penalty=p.repetition_penalty,
            return_full_text=bool(p.return_full_text), seed=p.seed, stop=list(p.stop or []),
            temperature=p.temperature, top_k=p.top_k, top_n_tokens=p.top_n_tokens, top_p=p.top_p,
            truncate=p.truncate, typical_p=p.typical_p, watermark=bool(p.watermark),
            adapter_id=p.adapter_id,
        )

    @property
    def sampling(self) -> bool:
        return (self.do_sample or (self.temperature is not None and self.temperature != 1.0)
                or self.top_k is not None or self.top_p is not None or self.typical_p is not None)


@dataclass
class ValidRequest:
    inputs: str
    prompt_ids: list[int]
    input_length: int
    max_new_tokens: int
    best_of: int
    top_n_tokens: int
    params: GenParams
    make_constraint: Callable[[], Any] | None = None
    multimodal: Any = None  # genserve.multimodal.inputs.MultiModalInputs: the prompt's images

    def sampling_params(self, seed: int | None = None) -> SamplingParams:
        p = self.params
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            do_sample=p.sampling,
            temperature=p.temperature if p.temperature is not None else 1.0,
            top_k=p.top_k or 0,
            top_p=p.top_p if p.top_p is not None else 1.0,
            typical_p=p.typical_p if p.typical_p is not None else 1.0,
            repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            presence_penalty=p.presence_penalty or 0.0,
            seed=seed if seed is not None else p.seed,
            stop=list(p.stop),
            top_n_tokens=self.top_n_tokens,
            prompt_logprobs=p.decoder_input_details,
            watermark=p.watermark,
            constraint=self.make_constraint() if self.make_constraint else None,
            adapter_id=p.adapter_id,
            multimodal=self.multimodal,
        )


def _finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise validation(f"`{name}` must be a finite number")


# The sampler divides float32 logits by the temperature (and by the repetition penalty): a
# divisor below this turns any logit beyond +-3.4e8 into inf (NaN probabilities), and float32
# rounds values under 1.2e-38 to subnormals or 0. Far below any useful setting (0.01 is already
# near-greedy), so such values are refused rather than silently clamped.
MIN_DIVISOR = 1e-30
F32_MAX = 3.4028234663852886e38


def _divisor(name: str, value: float | None) -> None:
    if value is not None and 0.0 < value < MIN_DIVISOR:
        raise validation(f"`{name}` must be >= {MIN_DIVISOR:g} (smaller values overflow the float32 "
                         f"logits; use greedy decoding instead). Given: {value:g}")
    if value is not None and value > F32_MAX:
        raise validation(f"`{name}` must be <= {F32_MAX:g} (float32). Given: {value:g}")

FLOAT_FIELDS = ("temperature", "repetition_penalty", "frequency_penalty", "presence_penalty",
                "top_p", "typical_p")
I32_MAX = 2**31 - 1  # TGI's top_k is an i32
F32_TINY = 1.1754943508222875e-38  # float32's smallest normal (F32_MAX above)


def check_engine_ranges(p: GenParams) -> None:
    """Refuse numbers the engine cannot hold (issue 16, item 10): the sampler keeps every
    request's parameters in float32 and int64 columns shared by its batch, so a value outside
    them must never reach it. A non-zero float must be a normal float32 (1e-320 would become 0,
    1e39 infinity); ``top_k`` fits TGI's i32. Other integers are bounded by the checks below
    (``max_new_tokens`` by ``max_total_tokens``, ``seed`` by u64, ``best_of``, ``top_n_tokens``,
    ``truncate`` by their limits)."""
    for name in FLOAT_FIELDS:
        value = getattr(p, name)
        if value is not None and value != 0 and not F32_TINY <= abs(value) <= F32_MAX:
            raise validation(f"`{name}` must be 0 or a float32 between {F32_TINY:.6g} and {F32_MAX:.6g} "
                             f"in magnitude. Given: {value!r}")
    if p.top_k is not None and p.top_k > I32_MAX:
        raise validation(f"`top_k` must be <= {I32_MAX}. Given: {p.top_k}")


def check_parameters(limits, p: GenParams, *, stream: bool = False) -> None:
    """The checks TGI makes before tokenizing, in its order."""
    for name in FLOAT_FIELDS:
        _finite(name, getattr(p, name))
    # The divisors first: their message says why (and what to use instead) for the values that
    # the general float32 range check would also refuse.
    _divisor("temperature", p.temperature)
    _divisor("repetition_penalty", p.repetition_penalty)
    check_engine_ranges(p)
    best_of = 1 if p.best_of is None else p.best_of
    if best_of != 1:
        if limits.max_best_of == 1:
            raise validation("`best_of` != 1 is not allowed for this endpoint")
        if best_of < 1 or best_of > limits.max_best_of:
            raise validation(f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
        if stream:
            raise validation("`best_of` != 1 is not supported when streaming tokens")
    if best_of > 1 and not p.sampling:
        raise validation("you must use sampling when `best_of` is > 1")
    if p.temperature is not None and p.temperature <= 0.0:
        raise validation("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and p.repetition_penalty <= 0.0:
        raise validation("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise validation("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.presence_penalty is not None and not -2.0 <= p.presence_penalty <= 2.0:
        raise validation("`presence_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise validation("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise validation("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise validation("`top_k` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise validation("`max_new_tokens` must be strictly positive")
    if len(p.stop) > limits.max_stop_sequences:
        raise validation(f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
                         f"Given: {len(p.stop)}")
    if any(s == "" for s in p.stop):
        raise validation("`stop` sequences cannot be empty")
    if p.seed is not None:
        if best_of > 1:
            raise validation("`seed` must not be set when `best_of` > 1")
        if not 0 <= p.seed <= U64_MAX:
            raise validation(f"`seed` must be >= 0 and <= {U64_MAX}")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= limits.max_top_n_tokens:
        raise validation(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. "
                         f"Given: {p.top_n_tokens}")
    if p.truncate is not None and not 0 < p.truncate <= limits.max_input_tokens:
        raise validation(f"`truncate` must be strictly positive and less than "
                         f"{limits.max_input_tokens}. Given: {p.truncate}")
    # Prompt logprobs need no flag: the runner computes them in bounded chunks (model_runner).
    if p.decoder_input_details and stream:
        raise validation("`decoder_input_details` == true is not supported when streaming tokens")


def tokenize(tokenizer, inputs: str, add_special_tokens: bool) -> list[int]:
    if tokenizer is None:
        raise validation("this model has no tokenizer: send token ids")
    return tokenizer(inputs, add_special_tokens=add_special_tokens)["input_ids"]


async def validate(state, inputs: str | list[int], p: GenParams, *, add_special_tokens: bool = True,
                   stream: bool = False, images: list[str] | None = None) -> ValidRequest:
    """Check, tokenize and compile one request (TGI's ``validate`` span when tracing).

    ``images``: the image URLs of a chat prompt, whose text holds the processor's image token
    once for each. Without it, a vision-language model reads images from TGI's markdown in
    ``inputs`` (``![](url)``); a text-only model leaves that markdown as text, as TGI does."""
    with tracing.child("validate"):
        tracing.record_parameters(p)
        return await _validate(state, inputs, p, add_special_tokens=add_special_tokens, stream=stream,
                               images=images)


async def _validate(state, inputs: str | list[int], p: GenParams, *, add_special_tokens: bool,
                    stream: bool, images: list[str] | None = None) -> ValidRequest:
    limits = state.limits
    check_parameters(limits, p, stream=stream)
    multimodal = None
    if images and state.multimodal is None:
        raise validation("image inputs are not supported by this model (it is text-only)")
    if isinstance(inputs, str):
        if not inputs:
            raise validation("`inputs` cannot be empty")
        if state.multimodal is not None:
            ids, multimodal = await image_prompt(state, inputs, images, add_special_tokens)
        elif len(inputs) > INLINE_TOKENIZE_CHARS:
            ids = await state.in_worker(tokenize, state.tokenizer, inputs, add_special_tokens)
        else:
            ids = tokenize(state.tokenizer, inputs, add_special_tokens)
        text = inputs
    else:
        vocab = state.vocab_size
        if any(not 0 <= t < vocab for t in inputs):
            raise validation(f"token ids must be >= 0 and < {vocab}")
        ids = list(inputs)
        text = state.tokenizer.decode(ids) if state.tokenizer is not None else ""
        if state.multimodal is not None and state.multimodal.image_token_id in ids:
            raise validation("token ids hold the image token but no image (send images as text "
                             "with markdown images or as chat image_url parts)")
    if not ids:
        raise validation("`inputs` cannot be empty")
    if p.truncate is not None:
        if multimodal is not None and p.truncate < len(ids):
            raise validation(f"`truncate` ({p.truncate}) would cut a prompt with images "
                             f"({len(ids)} tokens, images included)")
        ids = ids[-p.truncate:]
    input_length = len(ids)
    max_new = p.max_new_tokens
    if max_new is None:
        max_new = min(max(limits.max_total_tokens - input_length, 0), DEFAULT_GENERATION_LENGTH)
    if input_length + max_new > limits.max_total_tokens:
        raise validation(f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                         f"Given: {input_length} `inputs` tokens and {max_new} `max_new_tokens`")
    if input_length > limits.max_input_tokens:
        raise validation(f"`inputs` must have less than {limits.max_input_tokens} tokens. "
                         f"Given: {input_length}")
    if p.adapter_id is not None and p.adapter_id not in state.lora_adapters:
        loaded = ", ".join(sorted(state.lora_adapters)) or "none"
        raise validation(f"adapter `{p.adapter_id}` is not loaded (--lora-adapters); loaded: {loaded}")
    make_constraint = None
    if p.grammar is not None:
        make_constraint = await compile_grammar(state, *p.grammar)
    return ValidRequest(text, ids, input_length, max_new, p.best_of or 1, p.top_n_tokens or 0, p,
                        make_constraint, multimodal)


async def compile_grammar(state, kind: str, value: Any):
    from genserve.server.grammar import GrammarError

    if state.limits.disable_grammar:
        raise validation("grammar is not supported")
    if not state.grammar_supported:  # e.g. a tokenizer llguidance cannot load
        raise validation(f"grammar is not supported: {state.grammar.unsupported or 'unavailable'}")
    try:
        return await asyncio.wait_for(state.in_worker(state.grammar.compile, kind, value),
                                      GRAMMAR_COMPILE_TIMEOUT_S)
    except GrammarError as exc:
        raise validation(str(exc)) from None
    except asyncio.TimeoutError:
        raise validation(f"grammar is too complex: it did not compile within {GRAMMAR_COMPILE_TIMEOUT_S:g} s") from None
