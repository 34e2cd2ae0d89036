"""Turns a scheduled batch into model inputs, runs the model and samples.

The flat-batch layout (no padding) is described in ``attention/base.py``. Backends subclass
``ModelRunner`` to add device-specific speed (CUDA graphs) by overriding ``execute``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from genserve.attention.base import AttentionMetadata
from genserve.engine.constraints import bitmask_words, unpack_bitmask
from genserve.engine.sampler import SamplerOutput, SamplingBatch, sample
from genserve.engine.scheduler import ScheduledSeq
from genserve.models.base import ForwardBatch


@dataclass
class StepResult:
    """What one step produced for one scheduled sequence."""

    token: int | None = None  # None when the sequence is mid-prefill
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # for prompt tokens this step


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logit_rows: torch.Tensor  # rows whose logits feed the sampler
    sampling_index: list[int]  # scheduled index for each sampled row
    prompt_rows: dict[int, tuple[int, int]]  # scheduled index -> (first row, n rows) for prompt logprobs


class ModelRunner:
    def __init__(self, model, config, backend):
        self.model, self.config, self.backend = model, config, backend
        self.device = backend.device
        self.block_size = config.block_size
        self.kv_caches: list[torch.Tensor] = []
        self.vocab_size = model.config.vocab_size

    # -- KV cache -------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        spec = self.model.kv_cache_spec()
        itemsize = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * spec.num_layers * self.block_size * spec.num_kv_heads * spec.head_dim * itemsize

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.config.kv_cache_dtype or self.config.dtype

    def allocate_kv_cache(self, num_blocks: int) -> None:
        spec = self.model.kv_cache_spec()
        shape = (2, num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                          for _ in range(spec.num_layers)]

    # -- inputs ---------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledSeq]) -> PreparedBatch:
        ids, pos, slots, q_lens, seq_lens, tables = [], [], [], [], [], []
        logit_rows, sampling_index, prompt_rows = [], [], {}
        bs = self.block_size
        for i, s in enumerate(scheduled):
            seq, start, n = s.seq, s.seq.num_computed, s.num_tokens
            row0 = len(ids)
            table = seq.block_table
            if n == 1:  # decode: avoid building the whole token list every step
                ids.append(seq.token_at(start))
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids += seq.all_ids[start:start + n]
                pos += range(start, start + n)
                slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            q_lens.append(n)
            seq_lens.append(start + n)
            tables.append(table)
            if seq.params.prompt_logprobs and not seq.output_ids and start < len(seq.prompt_ids):
                prompt_rows[i] = (row0, n)
            if s.completes:
                logit_rows.append(row0 + n - 1)
                sampling_index.append(i)
        width = max(len(t) for t in tables)
        dev = self.device

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        attn = AttentionMetadata(
            cu_seqlens_q=t(cu, torch.int32),
            seq_lens=t(seq_lens, torch.int32),
            block_tables=t([tb + [0] * (width - len(tb)) for tb in tables], torch.int32),
            slot_mapping=t(slots, torch.long),
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(seq_lens),
            is_decode_only=all(n == 1 for n in q_lens),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=q_lens,
        )
        return PreparedBatch(t(ids, torch.long), t(pos, torch.long), attn,
                             t(logit_rows, torch.long), sampling_index, prompt_rows)

    def sampling_batch(self, scheduled: list[ScheduledSeq], index: list[int]) -> SamplingBatch:
        seqs = [scheduled[i].seq for i in index]
        params = [s.params for s in seqs]
        batch = SamplingBatch.build(
            params, [s.seed for s in seqs], [len(s.output_ids) for s in seqs],
            [s.all_ids for s in seqs] if any(p.repetition_penalty != 1.0 or p.watermark for p in params)
            else [[] for _ in seqs],
            [s.output_ids for s in seqs], self.device,
            self.config.watermark_gamma, self.config.watermark_delta,
        )
        constrained = [(row, p.constraint) for row, p in enumerate(params) if p.constraint is not None]
        if constrained:
            bitmask = torch.full((len(seqs), bitmask_words(self.vocab_size)), -1, dtype=torch.int32)
            for row, constraint in constrained:
                constraint.fill_bitmask(bitmask, row)
            batch.allowed = unpack_bitmask(bitmask.to(self.device), self.vocab_size)
        return batch

    def encoder_states(self, scheduled: list[ScheduledSeq]) -> list | None:
        """Encoder-decoder models: encode the prompts of requests at their first step (one
        batched call), then every scheduled request's state in batch order. None otherwise."""
        if not getattr(self.model, "is_encoder_decoder", False):
            return None
        new = [s.seq for s in scheduled if s.seq.encoder_state is None]
        if new:
            for seq, state in zip(new, self.model.encode([seq.encoder_ids for seq in new])):
                seq.encoder_state = state
        return [s.seq.encoder_state for s in scheduled]

    # -- execution ------------------------------------------------------------------------
    def execute(self, input_ids, positions, batch: ForwardBatch) -> torch.Tensor:
        """The forward pass; backends override this (e.g. to replay CUDA graphs)."""
        return self.model(input_ids, positions, batch)

    @torch.inference_mode()
    def step(self, scheduled: list[ScheduledSeq]) -> list[StepResult]:
        prep = self.prepare(scheduled)
        batch = ForwardBatch(prep.attn, self.kv_caches, self.encoder_states(scheduled))
        hidden = self.execute(prep.input_ids, prep.positions, batch)
        results = [StepResult() for _ in scheduled]

        if prep.sampling_index:
            logits = self.model.compute_logits(hidden[prep.logit_rows])
            out: SamplerOutput = sample(logits, self.sampling_batch(scheduled, prep.sampling_index))
            tokens = out.tokens.tolist()  # the one host sync of a step
            logprobs = out.logprobs.tolist()
            top_ids = out.top_ids.tolist() if out.top_ids is not None else None
            top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
            for row, i in enumerate(prep.sampling_index):
                r = results[i]
                r.token, r.logprob = tokens[row], logprobs[row]
                n_top = scheduled[i].seq.params.top_n_tokens
                if top_ids is not None and n_top:
                    r.top = list(zip(top_ids[row][:n_top], top_lps[row][:n_top]))

        for i, (row0, n) in prep.prompt_rows.items():
            results[i].prompt_logprobs = self._prompt_logprobs(scheduled[i], hidden[row0:row0 + n])
        return results

    def _prompt_logprobs(self, s: ScheduledSeq, hidden: torch.Tensor) -> list[float]:
        """Log-probability of each prompt token given the ones before it (rows of this chunk)."""
        seq, start = s.seq, s.seq.num_computed
        prompt = seq.prompt_ids
        logprobs = self.model.compute_logits(hidden).float().log_softmax(-1)
        # Row j predicts token start + j + 1, which is a prompt token while < len(prompt).
        targets = [prompt[p + 1] for p in range(start, start + s.num_tokens) if p + 1 < len(prompt)]
        if not targets:
            return []
        idx = torch.tensor(targets, device=logprobs.device)
        return logprobs[: len(targets)].gather(1, idx[:, None])[:, 0].tolist()
