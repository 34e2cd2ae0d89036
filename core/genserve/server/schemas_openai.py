"""OpenAI-compatible request and response bodies (chat completions, completions, models)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from genserve.server.schemas_tgi import STRICT, doc


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = STRICT
    url: str
    detail: Optional[str] = None


class ImagePart(BaseModel):
    model_config = STRICT
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Union[TextPart, ImagePart]


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str
    arguments: Union[str, dict[str, Any]] = Field(description="JSON text (OpenAI) or an object")


class ToolCall(BaseModel):
    model_config = STRICT
    id: Union[str, int, None] = None
    type: Optional[Literal["function"]] = None
    function: FunctionCall


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None


class FunctionDefinition(BaseModel):
    model_config = STRICT
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"] = "function"
    function: FunctionName


class JsonSchemaFormat(BaseModel):
    model_config = STRICT
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema", "json", "regex"]
    json_schema: Optional[JsonSchemaFormat] = None
    value: Union[dict[str, Any], str, None] = Field(None, description="TGI's form: the schema or regex")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: Optional[bool] = None


class _Sampling(BaseModel):
    model_config = STRICT
    model: Optional[str] = doc("Served model name, or a LoRA adapter id")
    frequency_penalty: Optional[float] = doc("Penalty per previous occurrence", minimum=-2, maximum=2)
    presence_penalty: Optional[float] = doc("Penalty for any previous occurrence", minimum=-2, maximum=2)
    repetition_penalty: Optional[float] = doc("TGI's repetition penalty (1.0 = off)", exclusiveMinimum=0)
    logit_bias: Union[dict[str, float], list[float], None] = doc("Not supported; must be empty")
    max_tokens: Optional[int] = doc("Maximum number of generated tokens", exclusiveMinimum=0)
    n: Optional[int] = doc("Number of choices", minimum=1)
    seed: Optional[int] = doc("Random seed", minimum=0, maximum=2**64 - 1)
    stop: Union[str, list[str], None] = doc("Up to --max-stop-sequences stop texts")
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = doc("0 means greedy", minimum=0)
    top_p: Optional[float] = doc("Nucleus sampling", exclusiveMinimum=0, maximum=1)
    user: Optional[str] = None


class ChatRequest(_Sampling):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"example": {
        "model": "tgi", "messages": [{"role": "user", "content": "What is deep learning?"}],
        "max_tokens": 20}})
    messages: list[Message] = Field(description="The conversation so far")
    max_completion_tokens: Optional[int] = doc("Newer name of max_tokens", exclusiveMinimum=0)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = doc("Most likely tokens per position", minimum=0)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, str, None] = None
    tool_prompt: Optional[str] = doc("Text added after the tools when the template cannot show them")
    response_format: Optional[ResponseFormat] = None


class ChatTokenizeRequest(BaseModel):
    """/chat_tokenize's body: the parts of a chat request that make its prompt (the sampling
    fields of a full chat request are ignored there)."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"example": {
        "messages": [{"role": "user", "content": "What is deep learning?"}]}})
    messages: list[Message] = Field(description="The conversation so far")
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, str, None] = None
    tool_prompt: Optional[str] = doc("Text added after the tools when the template cannot show them")


class CompletionRequest(_Sampling):
    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"example": {
        "model": "tgi", "prompt": "What is deep learning?", "max_tokens": 20}})
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="A prompt, a list of prompts, or token ids")
    echo: Optional[bool] = None
    logprobs: Optional[int] = doc("Return log-probabilities with this many alternatives", minimum=0)
    suffix: Optional[str] = doc("Not supported")
    best_of: Optional[int] = doc("Sequences generated per prompt, of which the `n` with the highest "
                                 "log-probability sum are returned (>= n; not with stream)", minimum=1)


# -- responses ------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class OutputFunction(BaseModel):
    name: str
    arguments: str
    description: Optional[str] = None


class OutputToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: OutputFunction


class OutputMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    tool_calls: Optional[list[OutputToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: OutputMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: dict[str, Any]


class Delta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "tool_calls"]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: Optional[list[dict[str, float]]] = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
