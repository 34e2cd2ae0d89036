"""A draft model proposes (``--speculative-model PATH``): a smaller model of any registered
architecture that shares the target's tokenizer runs k cheap steps per verify step.

Its KV lives in its own cache tensors with the *same block layout* as the target's: the
engine's one ``BlockManager`` hands out block ids, and block ``b`` of a sequence holds the
target's K/V in the target's cache and the draft's in the draft's. So admission, lookahead
slots, preemption and freeing need nothing of their own, and the cache is sized with both
models' bytes per block (``kv_bytes_per_block``). What the draft has computed is tracked per
request (``_State``): a prefix-cache hit gives the target's K/V but not necessarily the
draft's, so a request's draft K/V starts from position 0 (one draft prefill of its prompt at
its first proposal), and after each verify step only the positions of accepted tokens stay
valid. Proposals are drawn with the request's own sampler and Gumbel noise (``verify``), and,
for a grammar-constrained request, under its grammar's mask.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from genserve.device import upload
from genserve.engine.kv_sizing import kv_bytes_per_block
from genserve.errors import ConfigError
from genserve.models.base import ForwardBatch
from genserve.spec_decode.base import ProposalRequest, Proposer, ProposerContext
from genserve.spec_decode.drafting import draw, paged_inputs

if TYPE_CHECKING:
    from genserve.engine.model_runner import ModelRunner


@dataclass
class _State:
    block_table: list[int]  # the list object it was computed into (a new one after preemption)
    computed: int  # positions whose draft K/V is valid


class DraftModelProposer(Proposer):
    name = "draft_model"

    def __init__(self, model, ctx: ProposerContext):
        self.model = model
        self.ctx = ctx
        self.runner: ModelRunner | None = None  # the draft's runner, made in bind()
        self._state: dict[str, _State] = {}

    @classmethod
    def create(cls, ctx: ProposerContext) -> DraftModelProposer:
        from genserve.distributed.state import get_tp_group
        from genserve.engine.model_builder import build_model
        from genserve.loader import source as sources
        from genserve.loader.hf_config import load_config, load_tokenizer

        path = getattr(ctx.args, "speculative_model", None)
        if not path:
            raise ConfigError("speculative method 'draft_model' needs --speculative-model PATH")
        if get_tp_group().size > 1:
            raise ConfigError("--speculative-model: a draft model under tensor parallelism "
                              "(--num-shard > 1) is not supported yet")
        args = copy.copy(ctx.args)
        args.model_id, args.revision, args.gguf_file = path, None, None
        args.quantize, args.lora_adapters = None, None
        src = sources.resolve(path, None, None)
        hf_config = load_config(src, args)
        if getattr(hf_config, "is_encoder_decoder", False):
            raise ConfigError(f"--speculative-model {path}: an encoder-decoder model cannot draft")
        if ctx.tokenizer is not None:
            draft_tok = load_tokenizer(src, args)
            if draft_tok is None or draft_tok.get_vocab() != ctx.tokenizer.get_vocab():
                raise ConfigError(f"--speculative-model {path}: its tokenizer differs from the "
                                  "target's (a draft must share the tokenizer)")
        elif hf_config.vocab_size != ctx.target_config.vocab_size:
            raise ConfigError(f"--speculative-model {path}: vocabulary of {hf_config.vocab_size} "
                              f"tokens, the target's has {ctx.target_config.vocab_size}")
        model, _, _ = build_model(ctx.plugins, ctx.backend, args, src, hf_config, ctx.dtype)
        return cls(model, ctx)

    def kv_bytes_per_block(self, block_size: int, kv_dtype: torch.dtype) -> int:
        return kv_bytes_per_block(self.model.kv_cache_spec(), block_size, kv_dtype)

    def bind(self, runner, num_blocks: int) -> None:
        from genserve.engine.model_runner import ModelRunner  # imports spec_decode.verify

        # The base runner (eager, no CUDA graphs): the draft's steps are small.
        self.runner = ModelRunner(self.model, runner.config, runner.backend)
        self.runner.allocate_kv_cache(num_blocks)

    def forget(self, request_id: str) -> None:
        self._state.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, requests: list[ProposalRequest]) -> list[list[int]]:
        """One catch-up forward (each sequence's tokens the draft has not computed, its last
        known token included), then k - 1 one-token steps; row j of a sequence is drawn as
        output index ``num_generated + j`` with the request's sampler."""
        if self.runner is None:
            raise RuntimeError("DraftModelProposer.propose before bind()")
        drafts: list[list[int]] = [[] for _ in requests]
        rows = []
        for r in requests:
            seq = r.seq
            st = self._state.get(seq.request_id)
            start = 0 if st is None or st.block_table is not seq.block_table \
                else min(st.computed, seq.num_computed)
            rows.append((seq.all_ids[start:], start))
        try:
            self._step(requests, rows, drafts, 0)
            for j in range(1, max(r.k for r in requests)):
                live = [i for i, r in enumerate(requests) if r.k > j]
                if not live:
                    break
                sub = [requests[i] for i in live]
                sub_drafts = [drafts[i] for i in live]
                self._step(sub, [([d[-1]], len(r.seq) - 1 + j) for r, d in zip(sub, sub_drafts)], sub_drafts, j)
        finally:
            # _step walked each grammar through the drafts: back to the request's own tokens.
            for r, d in zip(requests, drafts):
                if r.seq.params.constraint is not None:
                    r.seq.params.constraint.rollback(len(d))
        for r, d in zip(requests, drafts):
            self._state[r.seq.request_id] = _State(r.seq.block_table, len(r.seq) - 1 + len(d))
        return drafts

    def _step(self, requests: list[ProposalRequest], rows: list[tuple[list[int], int]],
              drafts: list[list[int]], j: int) -> None:
        """Run the draft over ``rows`` ((token ids, first position) per sequence), sample the
        next token of each sequence from its last row and append it to its ``drafts``."""
        runner = self.runner
        assert runner is not None
        ids, pos, meta, last = paged_inputs([r.seq.block_table for r in requests], rows,
                                            runner.block_size, runner.device)
        hidden = runner.forward(ids, pos, ForwardBatch(meta, runner.kv_caches))
        device = runner.device
        logits = runner.compute_logits(hidden[upload(torch.tensor(last, dtype=torch.long), device)])
        vocab = self.ctx.target_config.vocab_size
        for d, token in zip(drafts, draw(logits[:, :vocab], requests, drafts, j, runner.config,
                                          under_grammar=True)):
            d.append(token)
