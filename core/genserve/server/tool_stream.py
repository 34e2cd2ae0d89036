"""Tool calls read from the grammar-constrained output while it is generated.

``chat.tool_schema`` makes the model write ``{"name": <tool>, "arguments": <JSON>}`` or, for a
plain answer, ``{"name": "no_tool", "content": <string>}``; llguidance keeps the schema's
property order, so ``name`` always comes first. ``ToolCallReader`` turns that text, piece by
piece, into what OpenAI streams: the function name as soon as its string is closed, then the
arguments exactly as the model writes them, or the plain answer's content decoded as it grows.
The non-streamed answer reads its whole text with the same class, so the streamed argument
pieces always add up to the non-streamed ``arguments`` string.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from pydantic_core import from_json

NO_TOOL = "no_tool"

# Where the name ends and where the second value starts (at its first character, once written):
# a JSON parser gives values, not offsets, and the arguments are passed on as the model's text.
_NAME = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')
_VALUE_KEY = re.compile(r'\s*,\s*"(?:arguments|content)"\s*:\s*(?=\S)')
_decoder = json.JSONDecoder()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolDelta:
    """What one piece of output added."""

    name: str | None = None  # the called function, once, as soon as it is known
    arguments: str = ""  # the next piece of the arguments' JSON text
    content: str = ""  # the next piece of a plain answer


class ToolCallReader:
    """One choice's output: ``feed`` each new piece of text, get what it added."""

    def __init__(self):
        self.text = ""
        self.name: str | None = None
        self.arguments = ""  # handed out so far
        self.content = ""
        self._name_end: int | None = None
        self._value_at: int | None = None

    @property
    def is_call(self) -> bool:
        return self.name is not None and self.name != NO_TOOL

    def feed(self, piece: str, final: bool = False) -> ToolDelta:
        self.text += piece
        out = ToolDelta()
        if self.name is None and (m := _NAME.match(self.text)):
            self.name, self._name_end = json.loads(m.group(1)), m.end()
            out.name = self.name if self.is_call else None
        if self.name is None:
            if final:  # never became a tool object (cut short, or no grammar): plain text
                out.content = self.content = self.text
            return out
        if self._value_at is None and self._name_end is not None and (
                m := _VALUE_KEY.match(self.text, self._name_end)):
            self._value_at = m.end()
        if self._value_at is None:
            return out
        if self.is_call:
            out.arguments = _grow(self.arguments, self._arguments_text())
            self.arguments += out.arguments
        else:
            out.content = _grow(self.content, self._content_text())
            self.content += out.content
        return out

    def _arguments_text(self) -> str:
        # An unfinished value runs to the end of the text; a finished one stops before the
        # object's closing brace (raw_decode says where the value ends).
        assert self._value_at is not None  # feed() calls this once the value has started
        try:
            end = _decoder.raw_decode(self.text, self._value_at)[1]
        except json.JSONDecodeError:
            end = len(self.text)
        return self.text[self._value_at:end]

    def _content_text(self) -> str:
        # pydantic-core's partial mode decodes an unfinished string, leaving out a half-written
        # escape, so each result extends the previous one.
        try:
            content = from_json(self.text, allow_partial="trailing-strings").get("content", "")
        except ValueError:
            return self.content
        return content if isinstance(content, str) else self.content


def _grow(sent: str, now: str) -> str:
    """The part of ``now`` not yet handed out (nothing if it does not extend ``sent``)."""
    return now[len(sent):] if now.startswith(sent) else ""
