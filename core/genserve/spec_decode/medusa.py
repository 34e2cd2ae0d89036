"""Medusa heads (TGI's checkpoint format: ``medusa_num_heads``, ``medusa_num_layers``): not
implemented yet. Registered so that a Medusa checkpoint with ``--speculate`` is refused with
a clear message instead of silently falling back to n-gram proposals."""

from __future__ import annotations

from genserve.errors import ConfigError
from genserve.spec_decode.base import ProposalRequest, Proposer, ProposerContext


class MedusaProposer(Proposer):
    name = "medusa"

    @classmethod
    def create(cls, ctx: ProposerContext) -> MedusaProposer:
        raise ConfigError("--speculate: this checkpoint has Medusa heads (medusa_num_heads), which "
                          "genserve does not run yet; pass --speculative-method ngram to use n-gram "
                          "proposals instead")

    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        raise NotImplementedError  # create() always refuses
