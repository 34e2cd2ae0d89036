"""The interface grammar-constrained decoding plugs into the sampler with.

A constraint follows one request. Each step the runner asks every constrained request to
fill its row of a shared token bitmask (llguidance/xgrammar layout: int32 words, bit ``t % 32``
of word ``t // 32`` allows token ``t``), and the sampler applies the whole mask at once.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Constraint(Protocol):
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (CPU int32 tensor)."""

    def advance(self, token_id: int) -> None:
        """Consume the token that was sampled."""

    def is_finished(self) -> bool:
        """The grammar accepts no further token (generation ends as on EOS)."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, words] int32 -> [B, vocab_size] bool, on the bitmask's device."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = (bitmask[:, :, None] >> bits) & 1  # [B, words, 32]
    return allowed.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()
