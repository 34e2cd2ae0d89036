"""Incremental detokenization that only ever emits complete UTF-8 text.

The TGI/vLLM method: decode a short window of recent tokens twice (with and without the
newest) and emit the difference, holding it back while it ends in an incomplete character.
"""

from __future__ import annotations

from dataclasses import dataclass


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

    def token_text(self, token_id: int) -> str:
        """A single token's own text, as TGI reports it per token."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token_id], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
