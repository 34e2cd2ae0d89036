"""Which tensor-parallel rank this process is, and the collectives the layers need.

With one process (the default) every collective is the identity, so single-device code
pays nothing for TP support.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    # A gloo group over the same ranks for host-side agreement (a CPU tensor works with any
    # device backend); None means the default group.
    cpu_group: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` any rank holds (e.g. KV blocks: every rank must allocate the same)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())


_tp = TPGroup()


def get_tp_group() -> TPGroup:
    return _tp


def set_tp_group(rank: int, size: int, cpu_group=None) -> TPGroup:
    global _tp
    _tp = TPGroup(rank=rank, size=size, cpu_group=cpu_group)
    return _tp


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by the {denominator} tensor-parallel ranks")
    return numerator // denominator
