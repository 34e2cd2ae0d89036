"""Request and response bodies of TGI's routes (they also make the OpenAPI document).

Request models are strict (no "5" for 5, as TGI's serde) and ignore unknown fields. The value
rules that TGI checks in its router (temperature > 0, top_p < 1, ...) live in ``validation``,
so that their messages match TGI's; here they are only documented.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

STRICT = ConfigDict(strict=True, extra="ignore")


def doc(description: str, **schema) -> Any:
    return Field(None, description=description, json_schema_extra=schema or None)


class Grammar(BaseModel):
    model_config = STRICT
    type: Literal["json", "json_object", "json_schema", "regex"] = Field(
        description="json: a JSON Schema (object or string); json_schema: {name, schema}; regex: a regular expression")
    value: Union[dict[str, Any], str] = Field(description="The schema or the regular expression")


class GenerateParameters(BaseModel):
    model_config = STRICT
    adapter_id: Optional[str] = doc("LoRA adapter loaded with --lora-adapters")
    best_of: Optional[int] = doc("Generate best_of sequences and return the one with the highest "
                                 "log-probability sum", exclusiveMinimum=0)
    decoder_input_details: Optional[bool] = doc("Return the prompt tokens with their log-probabilities")
    details: Optional[bool] = doc("Return generation details")
    do_sample: Optional[bool] = doc("Sample instead of greedy decoding")
    frequency_penalty: Optional[float] = doc("Penalty per previous occurrence", minimum=-2, maximum=2)
    grammar: Optional[Grammar] = doc("Constrain the output to a JSON Schema or a regular expression")
    max_new_tokens: Optional[int] = doc("Maximum number of generated tokens", exclusiveMinimum=0)
    repetition_penalty: Optional[float] = doc("Repetition penalty (1.0 = off)", exclusiveMinimum=0)
    return_full_text: Optional[bool] = doc("Prepend the prompt to the generated text")
    seed: Optional[int] = doc("Random seed for sampling", minimum=0, maximum=2**64 - 1)
    stop: Optional[list[str]] = doc("Stop generating when one of these texts is produced")
    temperature: Optional[float] = doc("Sampling temperature", exclusiveMinimum=0)
    top_k: Optional[int] = doc("Top-k filtering", exclusiveMinimum=0)
    top_n_tokens: Optional[int] = doc("Return the n most likely tokens at each step", minimum=0)
    top_p: Optional[float] = doc("Nucleus sampling", exclusiveMinimum=0, exclusiveMaximum=1)
    truncate: Optional[int] = doc("Keep only the last `truncate` prompt tokens", exclusiveMinimum=0)
    typical_p: Optional[float] = doc("Typical decoding mass", exclusiveMinimum=0, exclusiveMaximum=1)
    watermark: Optional[bool] = doc("Green-list watermark (Kirchenbauer et al.)")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore",
                              json_schema_extra={"example": {"inputs": "My name is Olivier and I",
                                                             "parameters": {"max_new_tokens": 20}}})
    inputs: str = Field(description="The prompt")
    parameters: Optional[GenerateParameters] = None
    add_special_tokens: Optional[bool] = Field(None, description="Add the tokenizer's special tokens (default true)")


class CompatGenerateRequest(GenerateRequest):
    stream: Optional[bool] = Field(None, description="Answer with server-sent events")


class Token(BaseModel):
    id: int
    text: str
    logprob: Optional[float] = None
    special: bool


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: Optional[float] = None


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: Optional[int] = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: Optional[list[list[Token]]] = None


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: Optional[int] = None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: Optional[list[list[Token]]] = None
    best_of_sequences: Optional[list[BestOfSequence]] = None
    # genserve: present when speculative decoding proposed tokens for the request.
    speculative_proposed_tokens: Optional[int] = None
    speculative_accepted_tokens: Optional[int] = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: Optional[Details] = None


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: Optional[int] = None
    input_length: int
    speculative_proposed_tokens: Optional[int] = None  # genserve: as in Details
    speculative_accepted_tokens: Optional[int] = None


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: Optional[list[Token]] = None
    generated_text: Optional[str] = None
    details: Optional[StreamDetails] = None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int = Field(description="Byte offset of the token's text in the input")
    stop: int


class ChatTokenizeResponse(BaseModel):
    tokenize_response: list[SimpleToken]
    templated_text: str


class Info(BaseModel):
    model_id: str
    model_sha: Optional[str] = None
    model_pipeline_tag: Optional[str] = None
    model_dtype: str
    model_device_type: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: Optional[str] = None
    docker_label: Optional[str] = None
    # genserve's own
    backend: str
    attention: str
    quantize: Optional[str] = None
    kv_cache_dtype: Optional[str] = None
    block_size: int
    kv_blocks_total: int
    kv_cache_tokens: int
    lora_adapters: list[str]
    grammar_support: bool
    load_seconds: float


class ErrorResponse(BaseModel):
    error: str
    error_type: str
