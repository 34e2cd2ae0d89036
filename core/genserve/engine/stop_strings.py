"""Stop strings found in generated text as TGI finds them.

TGI's ``StopSequenceCriteria`` matches the stop strings on each token's text decoded with the
special tokens kept (``decode_token(..., skip_special_tokens=False)``), so a stop such as
``<|im_start|>`` ends generation when the model emits that special token, although the
returned text (decoded without special tokens) never shows it. ``StopMatcher`` keeps the tail
of that text, and which of its characters are visible, for one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopMatch:
    """A stop string found in the newest token's text."""

    stop: str  # the stop string (vLLM's ``stop_reason``)
    after: int  # characters of the newest token's text after the end of the match (dropped)
    visible: int  # characters of the match that are in the visible text (not special tokens)


class StopMatcher:
    """One sequence's stop strings, fed each new token's text in order."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._keep = max((len(s) for s in self.stops), default=0)
        self._text = ""  # the last characters fed (enough to hold the start of any stop)
        self._mask = ""  # per character of _text: "v" visible, "s" text of a special token

    def feed(self, piece: str, special: bool) -> StopMatch | None:
        """``piece``: the newest token's text (a special token's own text when ``special``).
        Returns the first stop (in the order given) that ends inside ``piece``, else None."""
        if not self.stops or not piece:
            return None
        text = self._text + piece
        mask = self._mask + ("s" if special else "v") * len(piece)
        for stop in self.stops:
            # Only the tail can hold a new match: the stop text ends in this piece.
            idx = text.find(stop, max(0, len(text) - len(piece) - len(stop)))
            if idx != -1:
                cut = idx + len(stop)
                return StopMatch(stop, after=len(text) - cut, visible=mask[idx:cut].count("v"))
        self._text, self._mask = text[-self._keep:], mask[-self._keep:]
        return None
