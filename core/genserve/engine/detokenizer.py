"""Incremental detokenization that only ever emits complete UTF-8 text.

The TGI/vLLM method: decode a short window of recent tokens twice (with and without the
newest) and emit the difference, holding it back while it ends in an incomplete character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback
_SPACE_MARKER = "\u2581"  # SentencePiece's "▁" (a leading space)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte (the inverse of
    ``bytes_to_unicode`` in openai/gpt-2 encoder.py, which HF tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@dataclass
class DecodeState:
    prefix_offset: int = 0
    read_offset: int = 0


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # None: serve token ids only (dummy benchmark models)
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def start(self, prompt_ids: list[int]) -> DecodeState:
        # A few prompt tokens of context make the first output token's leading space right.
        n = len(prompt_ids)
        return DecodeState(prefix_offset=max(n - 5, 0), read_offset=n)

    def step(self, state: DecodeState, ids: list[int], base: int = 0) -> str:
        """Text added by the newest token (may be '' while a character is split). ``ids`` are
        the sequence's ids from position ``base`` (<= ``state.prefix_offset``) on, so callers
        need not copy a long sequence every token."""
        if self.tokenizer is None:
            return ""
        prefix = self._decode(ids[state.prefix_offset - base:state.read_offset - base])
        full = self._decode(ids[state.prefix_offset - base:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            state.prefix_offset, state.read_offset = state.read_offset, base + len(ids)
            return full[len(prefix):]
        return ""

    def flush(self, state: DecodeState, all_ids: list[int]) -> str:
        """Whatever is still held back at the end of generation (a dangling byte sequence)."""
        prefix = self._decode(all_ids[state.prefix_offset:state.read_offset])
        full = self._decode(all_ids[state.prefix_offset:])
        return full[len(prefix):] if len(full) > len(prefix) else ""

    @cached_property
    def _byte_level(self) -> dict[str, int] | None:
        """The byte-level alphabet when the tokenizer decodes with ByteLevel (GPT-2, Llama 3,
        SmolLM2), else None."""
        try:
            from tokenizers import decoders

            backend = self.tokenizer.backend_tokenizer
        except (AttributeError, ImportError):
            return None
        if isinstance(backend.decoder, decoders.ByteLevel):
            return _byte_level_decoder()
        return None

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes, which may be part of a UTF-8 character (byte-level and
        byte-fallback tokens split multi-byte characters), with a SentencePiece "▁" as the
        space it stands for. Added and special tokens are their text's UTF-8."""
        if self.tokenizer is None:
            return b""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        added = token_id in self.special_ids or piece in getattr(self.tokenizer, "added_tokens_encoder", {})
        alphabet = self._byte_level
        if not added and alphabet is not None and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        if not added and (m := _BYTE_PIECE.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        if not added and _SPACE_MARKER in piece:
            return piece.replace(_SPACE_MARKER, " ").encode()
        if alphabet is None and not added:
            return self.token_text(token_id).encode()
        return piece.encode()

    def token_text(self, token_id: int) -> str:
        """A single token's own text, as TGI reports it per token."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
