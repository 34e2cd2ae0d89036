"""N-gram proposals (prompt lookup decoding, Saxena 2023; TGI's ``--speculate`` without Medusa
heads, vLLM's ``ngram`` method): find the sequence's last n tokens earlier in the sequence and
propose the tokens that followed them there. Free to compute, and good where the output copies
from the input (rewriting, summarising, code editing)."""

from __future__ import annotations

from genserve.spec_decode.base import ProposalRequest, Proposer, ProposerContext


def lookup(ids: list[int], k: int, max_n: int, min_n: int = 1) -> list[int]:
    """Up to ``k`` tokens following the latest earlier occurrence of the longest suffix of
    ``ids`` (from ``max_n`` down to ``min_n`` tokens) that occurs earlier; [] when none does."""
    L = len(ids)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = ids[L - n:]
        # Latest start s < L - n with ids[s:s+n] == suffix and at least one token after it.
        for s in range(L - n - 1, -1, -1):
            if ids[s:s + n] == suffix:
                return ids[s + n:s + n + k]
    return []


class NgramProposer(Proposer):
    name = "ngram"
    max_ngram = 3  # longest suffix looked up (vLLM's prompt_lookup_max default is 5; TGI uses 3)

    @classmethod
    def create(cls, ctx: ProposerContext) -> NgramProposer:
        return cls()

    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        return [lookup(r.seq.all_ids, r.k, self.max_ngram) for r in requests]
