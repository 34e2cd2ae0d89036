"""EAGLE-1 proposes (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature
Uncertainty"; ``--speculative-model PATH --speculative-method eagle``).

A draft of one decoder layer (the target architecture's own layer class) extrapolates the
target's features: for position ``p`` it reads the pair (token ``x[p+1]``, the target's final
hidden state ``f[p]``), ``x = fc(concat(embed(x[p+1]), f[p]))``, runs the layer over ``x`` with
causal attention over its own K/V of the earlier pairs, and predicts the feature ``g[p+1]``;
the *target's* LM head turns ``g[p+1]`` into a proposal for ``x[p+2]``. Further proposals run
the draft on its own predicted features: the pair (proposal, ``g``) at the next position.
As in EAGLE's ``cnets.py`` and vLLM's ``llama_eagle.py``: the first layer has no input norm,
the draft's output is not normed (the layer's output plus its residual), embed comes first in
the concatenation.

Checkpoint (the EAGLE repository's, e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B; vLLM reads the
same): ``config.json`` of a ``LlamaForCausalLM`` (usually one layer, the target's hidden size),
safetensors holding ``fc.weight`` [hidden, 2 * hidden] (``fc.bias`` optional),
``layers.{i}.*`` with the target family's names, and optionally ``embed_tokens.weight`` (else
the target's embedding is used). EAGLE-3 checkpoints (``midlayer.*``) are refused.

The target's hidden states come from its own steps (``observe``): after each step the draft
runs over the pairs that step made known (a prompt's, a verify step's accepted ones), so its
K/V is current when ``propose`` runs ``k`` draft steps. Its K/V lives in its own cache tensors
with the target's block layout (as ``draft_model``). A sequence's draft attends only to the
positions it computed for this sequence: a prefix-cache hit gives no hidden states for the
cached positions, so the draft's attention starts at the first block it computed
(``drafting.paged_inputs``'s ``firsts``), which loses context, never correctness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from genserve.engine.kv_sizing import kv_bytes_per_block
from genserve.errors import ConfigError
from genserve.layers.custom_op import use_layer_ops
from genserve.layers.weights import weight_loader_of
from genserve.models.base import ForwardBatch, KVCacheSpec
from genserve.spec_decode.base import ProposalRequest, Proposer, ProposerContext, TargetHidden
from genserve.spec_decode.drafting import draw, paged_inputs

if TYPE_CHECKING:
    from genserve.engine.config import EngineConfig
    from genserve.engine.model_runner import ModelRunner
    from genserve.models.llama import LlamaLayer


class EagleDraft(nn.Module):
    """The draft network: ``fc``, ``layers`` (the target family's decoder layers, built by the
    target's ``make_layer``, the first without its input norm) and an optional own
    ``embed_tokens``, else the target's embedding (the target's LM head turns its output into
    logits). ``forward(ids [T], hidden [T, H], positions [T], batch)`` -> the predicted
    features [T, H] (the LM head's input)."""

    def __init__(self, target, config, ctx, fc_bias: bool, own_embedding: bool):
        super().__init__()
        self.target_embed = target.embed  # a bound method: the target's module stays out of the draft's
        self.embed_tokens: nn.Module | None = None
        with torch.device(ctx.device), use_layer_ops(ctx.layer_ops):
            self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=fc_bias, dtype=ctx.dtype)
            layers: list[LlamaLayer] = [target.make_layer(config, i, ctx) for i in range(config.num_hidden_layers)]
            self.layers = nn.ModuleList(layers)
            if own_embedding:
                from genserve.layers.embedding import VocabParallelEmbedding

                self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx.dtype)
        # EAGLE-1 normalises the fc output only through the layer's post-attention norm: its
        # first layer has no input norm (cnets.py skips it; vLLM's llama_eagle.py too).
        cast(Any, layers[0]).input_layernorm = nn.Identity()
        self.rotary = layers[0].self_attn.rotary_emb
        for layer in layers[1:]:
            layer.self_attn.rotary_emb = self.rotary
        self.attn_spec = layers[0].self_attn.attn.spec

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.target_embed(ids) if self.embed_tokens is None else self.embed_tokens(ids)

    def forward(self, ids, hidden, positions, batch: ForwardBatch) -> torch.Tensor:
        x = self.fc(torch.cat([self.embed(ids), hidden.to(self.fc.weight.dtype)], dim=-1))
        rows = self.rotary.cache_rows(positions, batch.attn)
        residual = None
        for layer in self.layers:
            x, residual = layer(rows, x, residual, batch)
        return x + residual

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(len(self.layers), self.attn_spec.num_kv_heads, self.attn_spec.head_dim)


def load_draft(draft: EagleDraft, names_and_tensors, stacked_params) -> None:
    """Fill ``draft``'s parameters from the checkpoint's ``(name, tensor or lazy slice)``
    pairs, fusing q/k/v and gate/up as the target family does (``stacked_params``). Raises
    ``ConfigError`` for a tensor of the wrong shape or parameters the checkpoint lacks."""
    params = dict(draft.named_parameters())
    loaded: set[str] = set()
    for ckpt_name, tensor in names_and_tensors:
        name = ckpt_name.removeprefix("model.")
        if name.startswith("layers.0.input_layernorm.") or "rotary_emb.inv_freq" in name:
            continue  # the first layer has no input norm
        target, shard = name, None
        for fragment, (repl, shard_id) in stacked_params:
            if fragment in name and name.replace(fragment, repl) in params:
                target, shard = name.replace(fragment, repl), shard_id
                break
        if target not in params:
            continue  # e.g. a norm or lm_head the draft does not use
        param = params[target]
        try:
            if shard is None:
                weight_loader_of(param)(param, tensor)
            else:
                weight_loader_of(param)(param, tensor, shard)
        except (ValueError, AssertionError, RuntimeError) as exc:
            raise ConfigError(f"EAGLE draft: tensor {ckpt_name}: {exc}") from None
        loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ConfigError(f"EAGLE draft: the checkpoint has no weights for {', '.join(missing)}")


@dataclass
class _State:
    block_table: list[int]  # the list object it was computed into (a new one after preemption)
    origin: int  # first position the draft attends to (a block boundary)
    computed: int  # pairs origin .. computed - 1 are in the draft's K/V
    last: torch.Tensor | None = None  # [H]: the draft's output at pair computed - 1


class EagleProposer(Proposer):
    name = "eagle"
    needs_hidden_states = True

    def __init__(self, draft: EagleDraft, ctx: ProposerContext):
        self.draft, self.ctx = draft, ctx
        self.lm_head = ctx.target_model.compute_logits  # EAGLE-1 drafts end in the target's LM head
        self.vocab_size = ctx.target_config.vocab_size
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = 0
        self.config: EngineConfig | None = None  # the engine's config, from bind()
        self._state: dict[str, _State] = {}

    @classmethod
    def create(cls, ctx: ProposerContext) -> EagleProposer:
        from genserve.distributed.state import get_tp_group
        from genserve.loader import source as sources
        from genserve.loader.hf_config import load_config
        from genserve.loader.safetensors_weights import iter_safetensors, safetensors_files
        from genserve.models.llama import LlamaForCausalLM
        from safetensors import safe_open

        path = getattr(ctx.args, "speculative_model", None)
        if not path:
            raise ConfigError("speculative method 'eagle' needs --speculative-model PATH (an EAGLE draft)")
        if get_tp_group().size > 1:
            raise ConfigError("EAGLE under tensor parallelism (--num-shard > 1) is not supported yet")
        target = ctx.target_model
        if not isinstance(target, LlamaForCausalLM):
            raise ConfigError(f"EAGLE: the draft layer is built with the target's layer class, and "
                              f"{type(target).__name__} is not of the Llama family (Llama, Mistral, "
                              "Qwen2, Phi-3, Gemma, Mixtral)")
        src = sources.resolve(path, None, None)
        config = load_config(src, ctx.args)
        if config.hidden_size != ctx.target_config.hidden_size:
            raise ConfigError(f"EAGLE draft {path}: hidden size {config.hidden_size}, the target's is "
                              f"{ctx.target_config.hidden_size}")
        try:
            files = safetensors_files(src.path)
        except FileNotFoundError as exc:
            raise ConfigError(f"EAGLE draft {path}: {exc}") from None
        names = set()
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                names |= {n.removeprefix("model.") for n in handle.keys()}
        if any(n.startswith("midlayer.") for n in names):
            raise ConfigError(f"EAGLE draft {path}: an EAGLE-3 checkpoint (midlayer.*), which genserve "
                              "does not run yet (EAGLE-1 only)")
        if "fc.weight" not in names:
            raise ConfigError(f"EAGLE draft {path}: no fc.weight (an EAGLE-1 draft has fc, layers.*)")
        # The draft's own layers are dense whatever the target's quantization.
        model_ctx = replace(target.ctx, quant=None)
        draft = EagleDraft(target, config, model_ctx, "fc.bias" in names, "embed_tokens.weight" in names)
        load_draft(draft, iter_safetensors(src.path, show_progress=False), type(target).stacked_params)
        draft.eval()
        return cls(draft, ctx)

    def kv_bytes_per_block(self, block_size: int, kv_dtype: torch.dtype) -> int:
        return kv_bytes_per_block(self.draft.kv_cache_spec(), block_size, kv_dtype)

    def bind(self, runner: ModelRunner, num_blocks: int) -> None:
        spec = self.draft.kv_cache_spec()
        shape = (2, num_blocks, runner.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=runner.kv_dtype, device=runner.device)
                          for _ in range(spec.num_layers)]
        self.block_size, self.config = runner.block_size, runner.config

    def forget(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    def _run(self, tables, rows, hidden, firsts) -> torch.Tensor:
        """The draft over ``rows`` ((token ids, first position) per sequence) with their input
        features ``hidden`` [T, H]; its output at each sequence's last row [B, H]."""
        ids, pos, meta, last = paged_inputs(tables, rows, self.block_size, hidden.device, firsts)
        out = self.draft(ids, hidden, pos, ForwardBatch(meta, self.kv_caches))
        return out[torch.tensor(last, device=out.device)]

    @torch.inference_mode()
    def observe(self, rows: list[TargetHidden]) -> None:
        """Run the draft over the pairs each sequence's rows made known: pair ``p`` is (token
        ``p + 1``, the target's hidden state at ``p``), for every observed ``p <= len - 2``."""
        if self.block_size == 0:
            raise RuntimeError("EagleProposer.observe before bind()")
        work = []  # (state, seq, first pair, hidden rows)
        for r in rows:
            seq = r.seq
            st = self._state.get(seq.request_id)
            if st is None or st.block_table is not seq.block_table or r.start > st.computed:
                # New, preempted, or a gap (no hidden states for positions before r.start, e.g.
                # a prefix-cache hit): the draft starts over at the next block boundary.
                origin = math.ceil(r.start / self.block_size) * self.block_size
                st = self._state[seq.request_id] = _State(seq.block_table, origin, origin)
            first = max(st.computed, r.start)
            end = min(r.start + len(r.hidden), len(seq) - 1)  # pair p needs token p + 1
            if end > first:
                work.append((st, seq, first, r.hidden[first - r.start:end - r.start]))
        if not work:
            return
        hidden = torch.cat([h for *_, h in work])
        tables = [seq.block_table for _, seq, _, _ in work]
        pairs = [(seq.all_ids[first + 1:first + 1 + len(h)], first) for _, seq, first, h in work]
        out = self._run(tables, pairs, hidden, [st.origin for st, *_ in work])
        for (st, _, first, h), g in zip(work, out):
            st.computed, st.last = first + len(h), g

    @torch.inference_mode()
    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        """Up to ``k`` proposals per sequence whose draft is current (its last pair at
        ``len - 2``): proposal 0 from the draft's last output, then ``k - 1`` draft steps, each
        on the previous proposal and the previous predicted feature. Drawn with the request's
        own sampler (``drafting.draw``); nothing for sequences whose draft is not current."""
        if self.config is None:
            raise RuntimeError("EagleProposer.propose before bind()")
        drafts: list[list[int]] = [[] for _ in requests]
        live, last = [], []
        for i, r in enumerate(requests):
            st = self._state.get(r.seq.request_id)
            if st is not None and st.last is not None and st.block_table is r.seq.block_table \
                    and st.computed == len(r.seq) - 1:
                live.append((i, st))
                last.append(st.last)
        if not live:
            return drafts
        feats = torch.stack(last)
        for j in range(max(requests[i].k for i, _ in live)):
            keep = [n for n, (i, _) in enumerate(live) if requests[i].k > j]
            live, feats = [live[n] for n in keep], feats[keep]
            if not live:
                break
            if j > 0:  # the pair (proposal j - 1, predicted feature) at position len - 2 + j
                seqs = [requests[i].seq for i, _ in live]
                feats = self._run([s.block_table for s in seqs],
                                  [([drafts[i][-1]], len(s) - 2 + j) for (i, _), s in zip(live, seqs)],
                                  feats, [st.origin for _, st in live])
            logits = self.lm_head(feats)[:, :self.vocab_size]
            sub = [requests[i] for i, _ in live]
            for (i, _), token in zip(live, draw(logits, sub, [drafts[i] for i, _ in live], j, self.config)):
                drafts[i].append(token)
        return drafts
