"""Accepting proposed tokens.

The verify step samples a token at each of the ``k + 1`` rows with the request's sampler
(``engine.sampler.sample``), row ``j`` with the draw of output index ``num_generated + j`` and
the proposals before it in the history. Proposal ``j`` is accepted when it equals the token
sampled at row ``j``, and only while every proposal before it was; the step emits the
accepted proposals and the token sampled at the first row that disagrees (or the bonus row
``k`` when all agree).

Every emitted token is therefore exactly the token decoding without speculation would have
sampled at that index: greedy rows take the argmax, sampled rows take the Gumbel-max draw of
the request's (seed, index). So outputs, seeded or not, are identical with speculation on and
off. For a deterministic proposal (n-gram, a greedy draft: ``q`` one-hot at ``x``) this *is*
the rejection rule of Leviathan et al. 2023 / Chen et al. 2023: ``x`` is accepted with
probability ``min(1, p(x)/q(x)) = p(x)``, and on rejection the token is distributed as the
residual ``norm(max(0, p - q))`` = ``p`` without ``x``, renormalised (a Gumbel-max argmax
conditioned on not being ``x``). For a sampled draft, proposals drawn with the *same* Gumbel
noise as the target (``draft_model``) are a coupled draw: still lossless, since the emitted
tokens never depend on the proposals, and accepted with probability P(argmax(log q + g) =
argmax(log p + g)) instead of 1 - TV(p, q).
"""

from __future__ import annotations


def accepted_prefix(proposed: list[int], sampled: list[int]) -> int:
    """How many leading ``proposed`` tokens (length k) equal the ``sampled`` ones (length
    k + 1, one per verified row). The step emits ``sampled[:n + 1]`` for the returned n."""
    if len(sampled) != len(proposed) + 1:
        raise ValueError(f"{len(proposed)} proposals need {len(proposed) + 1} sampled rows, got {len(sampled)}")
    n = 0
    while n < len(proposed) and proposed[n] == sampled[n]:
        n += 1
    return n
