"""Medusa heads propose (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework
with Multiple Decoding Heads"), in TGI's checkpoint format.

Head ``i`` reads the target's final hidden state ``h`` at the position the last known token
was sampled from and predicts the token ``i + 1`` places after that one:
``logits_i = W_i(ResBlock_{i,L-1}(... ResBlock_{i,0}(h)))`` with ``ResBlock(x) = x + SiLU(Wx + b)``.
Proposals are a chain, one token per head (not Medusa's candidate tree): a greedy request
takes each head's top-1 (TGI's choice); a sampled one draws from each head with its own
sampler and noise (``drafting.draw``), so agreeing heads are accepted there too. The
verify step keeps proposals only where they equal what the target samples, so outputs never
change.

Checkpoint (TGI's ``layers/medusa.py`` and ``models/__init__.py``; FasterDecoding/Medusa's
``medusa_lm_head.safetensors``): the model folder's ``config.json`` has ``medusa_num_heads``
and ``medusa_num_layers``; ``medusa_lm_head.safetensors`` next to it holds, for head ``i`` and
block ``j < medusa_num_layers``, ``{i}.{j}.linear.weight`` [hidden, hidden] and
``{i}.{j}.linear.bias`` [hidden], and ``{i}.{medusa_num_layers}.weight`` [vocab, hidden], the
head's own LM head. Without those (TGI's ``MedusaHeadV2``), every head ends in the target's
LM head. The hidden states come from the step that sampled the token (``observe``): Medusa
costs the heads' matmuls per step and no forward of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from genserve.errors import ConfigError
from genserve.spec_decode.base import ProposalRequest, Proposer, ProposerContext, TargetHidden
from genserve.spec_decode.drafting import draw

if TYPE_CHECKING:
    from genserve.engine.config import EngineConfig
    from genserve.engine.model_runner import ModelRunner
    from genserve.loader.source import ModelSource

HEADS_FILE = "medusa_lm_head.safetensors"


def medusa_config(folder: Path) -> dict | None:
    """The Medusa fields of ``folder/config.json`` (``medusa_num_heads``,
    ``medusa_num_layers``, ``base_model_name_or_path`` when present), or None when it has no
    ``medusa_num_heads``."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    if not config.get("medusa_num_heads"):
        return None
    return {k: config[k] for k in ("medusa_num_heads", "medusa_num_layers", "base_model_name_or_path")
            if k in config}


def model_source(src: ModelSource) -> tuple[ModelSource, dict | None]:
    """The model a ``--model-id`` serves, and its Medusa fields (None: no heads).

    TGI's layout of a Medusa repository (``models/__init__.py``): its ``config.json`` has
    ``medusa_num_heads`` and ``base_model_name_or_path``, and the model served is that base
    model, with the heads of ``medusa_lm_head.safetensors`` from the ``--model-id`` folder.
    Heads next to a full model's config (no ``base_model_name_or_path``) serve that model."""
    from genserve.loader import source as sources

    heads = None if src.is_gguf else medusa_config(src.path)
    if heads is not None and heads.get("base_model_name_or_path"):
        src = sources.resolve(heads["base_model_name_or_path"], None, None)
    return src, heads


class MedusaHeads(nn.Module):
    """All heads at once: ``linear_weight`` [heads, layers, hidden, hidden], ``linear_bias``
    [heads, layers, hidden] and ``out`` [heads, vocab, hidden] (None: the target's LM head).

    ``forward(x)``: ``x`` [B, hidden] -> logits [heads, B, vocab] (``heads`` may be cut to the
    first ``num`` heads)."""

    def __init__(self, linear_weight: torch.Tensor, linear_bias: torch.Tensor,
                 out: torch.Tensor | None, lm_head=None):
        super().__init__()
        self.linear_weight = nn.Parameter(linear_weight, requires_grad=False)
        self.linear_bias = nn.Parameter(linear_bias, requires_grad=False)
        self.out = None if out is None else nn.Parameter(out, requires_grad=False)
        self.lm_head = lm_head  # callable [N, hidden] -> [N, vocab] when out is None
        self.num_heads, self.num_layers = linear_weight.shape[:2]

    def forward(self, x: torch.Tensor, num: int | None = None) -> torch.Tensor:
        num = self.num_heads if num is None else num
        h = x.unsqueeze(0).expand(num, *x.shape)  # [heads, B, hidden]
        for j in range(self.num_layers):
            w, b = self.linear_weight[:num, j], self.linear_bias[:num, j]
            h = h + nn.functional.silu(torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)))
        if self.out is not None:
            return torch.bmm(h, self.out[:num].transpose(1, 2))
        assert self.lm_head is not None
        return self.lm_head(h.reshape(-1, h.shape[-1])).view(num, x.shape[0], -1)


def load_heads(folder: Path, config: dict, hidden_size: int, vocab_size: int,
               dtype: torch.dtype, device: torch.device, lm_head=None) -> MedusaHeads:
    """The heads of ``folder/medusa_lm_head.safetensors`` described by ``config`` (see the
    module docstring). Raises ``ConfigError`` naming the problem: no file, a missing tensor,
    a shape that does not fit the target's hidden size or vocabulary."""
    from safetensors import safe_open

    path = folder / HEADS_FILE
    if not path.is_file():
        raise ConfigError(f"Medusa heads: config.json has medusa_num_heads but {path} does not exist "
                          "(TGI's layout: medusa_lm_head.safetensors next to config.json)")
    num_heads, num_layers = int(config["medusa_num_heads"]), config.get("medusa_num_layers")
    if num_layers is None:
        raise ConfigError("Medusa heads: config.json has medusa_num_heads but no medusa_num_layers")
    num_layers = int(num_layers)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())

        def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in names:
                raise ConfigError(f"Medusa heads: {path.name} has no tensor {name!r} "
                                  f"(medusa_num_heads={num_heads}, medusa_num_layers={num_layers})")
            t = f.get_tensor(name)
            if tuple(t.shape) != shape:
                raise ConfigError(f"Medusa heads: {name} has shape {list(t.shape)}, the target "
                                  f"(hidden size {hidden_size}, vocabulary {vocab_size}) needs {list(shape)}")
            return t.to(device=device, dtype=dtype)

        weights = [[get(f"{i}.{j}.linear.weight", (hidden_size, hidden_size)) for j in range(num_layers)]
                   for i in range(num_heads)]
        biases = [[get(f"{i}.{j}.linear.bias", (hidden_size,)) for j in range(num_layers)]
                  for i in range(num_heads)]
        has_out = [f"{i}.{num_layers}.weight" in names for i in range(num_heads)]
        if any(has_out) and not all(has_out):
            missing = [f"{i}.{num_layers}.weight" for i, h in enumerate(has_out) if not h]
            raise ConfigError(f"Medusa heads: {path.name} has LM heads for some heads only (missing "
                              f"{', '.join(missing)})")
        out = torch.stack([get(f"{i}.{num_layers}.weight", (vocab_size, hidden_size))
                           for i in range(num_heads)]) if all(has_out) else None
    if num_layers == 0:
        empty = torch.empty(num_heads, 0, hidden_size, hidden_size, dtype=dtype, device=device)
        return MedusaHeads(empty, empty[..., 0], out, lm_head)
    return MedusaHeads(torch.stack([torch.stack(w) for w in weights]),
                       torch.stack([torch.stack(b) for b in biases]), out, lm_head)


@dataclass
class _Last:
    hidden: torch.Tensor  # [hidden_size]: the target's hidden state the last token came from
    length: int  # len(seq) when it was observed: valid while the sequence has that length


class MedusaProposer(Proposer):
    name = "medusa"
    needs_hidden_states = True

    def __init__(self, heads: MedusaHeads, vocab_size: int):
        self.heads, self.vocab_size = heads, vocab_size
        self.config: EngineConfig | None = None  # the engine's config (watermark settings), from bind()
        self._last: dict[str, _Last] = {}

    @classmethod
    def create(cls, ctx: ProposerContext) -> MedusaProposer:
        from genserve.distributed.state import get_tp_group
        from genserve.loader import source as sources

        args = ctx.args
        folder = sources.resolve(args.model_id, getattr(args, "revision", None), None).path
        config = medusa_config(folder)
        if config is None:
            raise ConfigError("speculative method 'medusa': the model's config.json has no medusa_num_heads "
                              "(a Medusa checkpoint in TGI's format has medusa_num_heads, "
                              "medusa_num_layers and medusa_lm_head.safetensors)")
        if get_tp_group().size > 1:
            raise ConfigError("Medusa heads under tensor parallelism (--num-shard > 1) are not supported yet")
        k, num_heads = ctx.num_speculative_tokens, int(config["medusa_num_heads"])
        if k > num_heads:  # TGI's rule: each proposed token needs its own head
            raise ConfigError(f"--speculate {k}: this Medusa checkpoint has only {num_heads} heads")
        tc = ctx.target_config
        heads = load_heads(folder, config, tc.hidden_size, tc.vocab_size, ctx.dtype,
                           ctx.backend.device, lm_head=ctx.target_model.compute_logits)
        return cls(heads, tc.vocab_size)

    def observe(self, rows: list[TargetHidden]) -> None:
        # Keep the row each sequence's last token was sampled from (position len(seq) - 2),
        # copied out of the step's hidden states in one gather.
        picked = [(r, r.hidden[-1]) for r in rows if r.start + len(r.hidden) == len(r.seq) - 1]
        if not picked:
            return
        kept = torch.stack([h for _, h in picked])
        for (r, _), h in zip(picked, kept):
            self._last[r.seq.request_id] = _Last(h, len(r.seq))

    def forget(self, request_id: str) -> None:
        self._last.pop(request_id, None)

    def bind(self, runner: ModelRunner, num_blocks: int) -> None:
        self.config = runner.config

    @torch.inference_mode()
    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        """Proposal ``i`` from head ``i`` for each sequence whose last token's hidden state was
        observed (nothing for the others, e.g. right after a recomputation), drawn with the
        request's own sampler as output index ``num_generated + i`` (``drafting.draw``:
        the head's argmax for greedy requests, a draw coupled with the target's for sampled
        ones)."""
        if self.config is None:
            raise RuntimeError("MedusaProposer.propose before bind()")
        out: list[list[int]] = [[] for _ in requests]
        live = []
        for i, r in enumerate(requests):
            last = self._last.get(r.seq.request_id)
            if last is not None and last.length == len(r.seq):
                live.append((i, last.hidden))
        if not live:
            return out
        num = min(max(requests[i].k for i, _ in live), self.heads.num_heads)
        logits = self.heads(torch.stack([h for _, h in live]), num)[..., :self.vocab_size]  # [num, B, vocab]
        for j in range(num):
            rows = [n for n, (i, _) in enumerate(live) if requests[i].k > j]
            sub = [live[n][0] for n in rows]
            tokens = draw(logits[j, rows], [requests[i] for i in sub], [out[i] for i in sub], j, self.config)
            for i, token in zip(sub, tokens):
                out[i].append(token)
        return out
