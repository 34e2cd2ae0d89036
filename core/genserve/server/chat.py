"""Chat prompts and tool calls.

The prompt is the model's chat template rendered by its tokenizer
(``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``), with ``tools``
passed when the template uses them. Tool calling works as in TGI: the output is constrained
by a JSON-Schema grammar to ``{"name": <tool>, "arguments": {...}}`` (or, under
``tool_choice=auto``, ``{"name": "no_tool", "content": "..."}`` for a plain answer), which
``tool_stream`` reads back, whole or while it streams.
"""

from __future__ import annotations

import json
from typing import Any

from genserve.server.errors import validation
from genserve.server.tool_stream import NO_TOOL, ToolCallReader, new_call_id

DEFAULT_TOOL_PROMPT = (
    "Given the functions available, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt. Respond in the format "
    '{"name": function name, "arguments": dictionary of argument name and its value}. '
    "Do not use variables.")


class ChatImages:
    """How a chat's image parts are written for the template: ``image_token`` (the processor's
    placeholder) where the template takes text, a ``{"type": "image"}`` part where it takes
    content lists (``structured``, the processor's own template); ``urls`` collects the
    images in prompt order. None of it exists for a text-only model, which refuses images."""

    def __init__(self, image_token: str, structured: bool):
        self.image_token, self.structured = image_token, structured
        self.urls: list[str] = []


def _content(content, images: ChatImages | None):
    """A message's content for the template: a string, or content parts when ``images`` is
    structured."""
    structured = images is not None and images.structured
    if content is None:
        return [] if structured else ""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if structured else content
    parts: list[dict] = []
    for part in content:
        if part.type == "image_url":
            if images is None:
                raise validation("image inputs are not supported by this model (it is text-only)")
            if part.image_url.detail not in (None, "auto"):  # refused, not silently ignored
                raise validation(f"`image_url.detail` {part.image_url.detail!r} is not supported: the model's "
                                 "processor decides the resolution (omit it or send \"auto\")")
            images.urls.append(part.image_url.url)
            parts.append({"type": "image"} if images.structured else {"type": "text", "text": images.image_token})
        else:
            parts.append({"type": "text", "text": part.text})
    return parts if structured else "".join(p["text"] for p in parts)


def _with_text(content, text: str):
    """``content`` (a string or content parts) with ``text`` appended."""
    if isinstance(content, list):
        return [*content, {"type": "text", "text": text}]
    return content + text


def _arguments(value) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def template_messages(messages, template: str, images: ChatImages | None = None) -> list[dict]:
    shows_tool_calls = "tool_calls" in template
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": _content(m.content, images)}
        if m.name:
            msg["name"] = m.name
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            calls = [{"id": str(c.id) if c.id is not None else None, "type": "function",
                      "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                     for c in m.tool_calls]
            if shows_tool_calls:
                msg["tool_calls"] = calls
            else:  # the template cannot show them: write the calls as the message text
                msg["content"] = _with_text(msg["content"], ("\n" if msg["content"] else "") + json.dumps(
                    [c["function"] for c in calls]))
        out.append(msg)
    return out


def render_chat(state, messages, tools=None, tool_prompt: str | None = None) -> tuple[str, list[str]]:
    """(prompt text, image URLs in prompt order). A vision-language model's chat goes through
    its processor's chat template when it has one (content parts, images as ``{"type":
    "image"}``), else through the tokenizer's with the processor's image token in the text;
    a text-only model refuses image parts (422)."""
    tok, mm = state.tokenizer, state.multimodal
    images = None
    template = getattr(tok, "chat_template", None) if tok is not None else None
    if mm is not None:
        structured = bool(mm.chat_template)
        template = mm.chat_template if structured else template
        images = ChatImages(mm.image_token, structured)
    if not template:
        raise validation("Template error: this model has no chat template "
                         "(pass --tokenizer-config-path with a chat_template)")
    if isinstance(template, dict):  # named templates
        template = template.get("tool_use" if tools else "default") or next(iter(template.values()))
    if not messages:
        raise validation("`messages` cannot be empty")
    msgs = template_messages(messages, template, images)
    kwargs: dict[str, Any] = {}
    if tools:
        tool_dicts = [t.model_dump(exclude_none=True, by_alias=True) for t in tools]
        if "tools" in template:
            kwargs["tools"] = tool_dicts
        else:  # as TGI: put the tools and the instructions into the last user message
            note = f"\n---\n{tool_prompt or DEFAULT_TOOL_PROMPT}\n{json.dumps(tool_dicts)}"
            for msg in reversed(msgs):
                if msg["role"] == "user":
                    msg["content"] = _with_text(msg["content"], note)
                    break
            else:
                msgs.append({"role": "user", "content": _content(note.lstrip(), images)})
    try:
        if images is not None and images.structured:
            return mm.render_chat(msgs, **kwargs), images.urls
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
        return text, images.urls if images is not None else []
    except Exception as exc:  # jinja errors, raise_exception() in templates
        raise validation(f"Template error: {exc}") from None


# -- tools --------------------------------------------------------------------------------
def tool_schema(tools, tool_choice) -> dict | None:
    """The JSON Schema that constrains a tool-calling answer, or None for a plain answer.
    A ``tool_choice`` that demands a call ("required" or a named tool) needs ``tools`` (422)."""
    if not tools and tool_choice not in (None, "auto", "none"):
        shown = tool_choice if isinstance(tool_choice, str) else f"function `{tool_choice.function.name}`"
        raise validation(f"`tool_choice` {shown} needs `tools`: no tools were given")
    if not tools or tool_choice == "none":
        return None
    by_name = {t.function.name: t for t in tools}
    if tool_choice is None or tool_choice in ("auto", "required"):
        chosen, allow_text = list(tools), tool_choice != "required"
    else:
        name = tool_choice if isinstance(tool_choice, str) else tool_choice.function.name
        if name not in by_name:
            raise validation(f"tool `{name}` is not in `tools` (choices: {', '.join(by_name)})")
        chosen, allow_text = [by_name[name]], False
    options = []
    for t in chosen:
        params = t.function.parameters or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": t.function.name},
                                                         "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if allow_text:
        options.append({"type": "object", "properties": {"name": {"const": NO_TOOL},
                                                         "content": {"type": "string"}},
                        "required": ["name", "content"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse_tool_output(text: str) -> tuple[str | None, list[dict] | None]:
    """Generated JSON -> (content, tool_calls), read as the stream reads it (tool_stream).
    Text that never became a tool object comes back as content."""
    reader = ToolCallReader()
    reader.feed(text, final=True)
    if not reader.is_call:
        return reader.content, None
    return None, [{"id": new_call_id(), "type": "function",
                   "function": {"name": reader.name, "arguments": reader.arguments}}]


def response_format_grammar(fmt) -> tuple[str, Any] | None:
    """OpenAI's (or TGI's) ``response_format`` as a grammar (kind, value)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ("json_schema", fmt.value) if isinstance(fmt.value, dict) else ("json_object", None)
    if fmt.type == "json_schema":
        if fmt.json_schema is not None and fmt.json_schema.schema_ is not None:
            return "json_schema", fmt.json_schema.schema_
        if fmt.value is not None:
            return "json_schema", fmt.value
        raise validation("`response_format` json_schema needs `json_schema.schema`")
    if fmt.value is None:
        raise validation(f"`response_format` of type {fmt.type} needs a `value`")
    return fmt.type, fmt.value
