"""Turns a scheduled batch into model inputs, runs the model and samples.

The flat-batch layout (no padding) is described in ``attention/base.py``. Backends subclass
``ModelRunner`` to add device-specific speed (CUDA graphs) by overriding ``execute``.

``launch`` only queues work: inputs go up in two pinned copies, sampled ids come back in
pinned copies marked by an event, so an engine may launch step N+1 before reading step N
(``overlap_steps``). A decode input that step N sampled is gathered on the device from
``last_tokens`` through ``Sequence.pending_row``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from genserve.attention.base import AttentionMetadata
from genserve.engine.constraints import bitmask_words, fill_verify_bitmask, unpack_bitmask
from genserve.engine.sampler import SamplerOutput, SamplingBatch, sample
from genserve.engine.scheduler import ScheduledSeq
from genserve.device import download, release, upload
from genserve.engine.config import EngineConfig
from genserve.engine.kv_sizing import kv_bytes_per_block
from genserve.engine.peers import Peers
from genserve.models.base import CausalLM, ForwardBatch
from genserve.multimodal.rows import image_rows
from genserve.spec_decode.verify import accepted_prefix

if TYPE_CHECKING:
    from genserve.lora.manager import LoRAManager


class RunnerBackend(Protocol):
    """What the base runner needs of the backend that created it (``backends.base.Backend``
    has it). A protocol, so this module does not import the backends package, which imports
    it to create runners."""

    @property
    def device(self) -> torch.device: ...


# The most logits prompt logprobs hold at once: 2**25 float32 values (128 MiB; with the
# log-softmax and the LM head's own output, under 0.5 GiB), 220 rows of a 152k vocabulary.
PROMPT_LOGPROBS_CHUNK_ELEMENTS = 1 << 25


@dataclass
class StepResult:
    """What one step produced for one scheduled sequence."""

    token: int | None = None  # None when the sequence is mid-prefill
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # for prompt tokens this step
    # A verify step (speculative decoding): the accepted proposals, each (id, logprob, top),
    # which come before ``token``; and how many tokens were proposed.
    accepted: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    num_proposed: int = 0


@dataclass
class PreparedBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn: AttentionMetadata
    logit_rows: torch.Tensor | None  # rows whose logits feed the sampler; None: every row
    sampling_index: list[int]  # scheduled index for each sampled row (k + 1 rows for a verify row)
    prompt_rows: dict[int, tuple[int, int]]  # scheduled index -> (first row, n rows) for prompt logprobs
    row_starts: list[int] = field(default_factory=list)  # each scheduled sequence's first input row


def _pack_aligned(segments: list[list[int]], dtype: torch.dtype, device) -> list:
    """Upload ``segments`` as one tensor, each starting on a 16-byte boundary; returns each
    segment's offset, then the tensor. Kernels specialise on their pointers' alignment, so a
    view whose alignment followed the batch's sizes compiled a new variant mid-serving."""
    per = 16 // torch.empty((), dtype=dtype).element_size()
    flat: list[int] = []
    offsets: list[int] = []
    for seg in segments:
        offsets.append(len(flat))
        flat += seg
        flat += [0] * (-len(seg) % per)
    return [*offsets, upload(torch.tensor(flat, dtype=dtype), device)]


class LaunchedStep:
    """A step whose work is queued on the device. ``results()`` waits for its sampled tokens,
    which were copied to the host without blocking, so the host can schedule and launch the
    next step while this one runs."""

    def __init__(self, scheduled: list[ScheduledSeq], sampling_index: list[int] | None = None,
                 out: SamplerOutput | None = None, device: torch.device | None = None):
        self.scheduled = scheduled
        self.sampling_index = sampling_index or []
        # With ``ModelRunner.keep_hidden_states``: the forward's hidden states [T, hidden] and
        # each scheduled sequence's first row in them, for proposers that draft from them.
        self.hidden: torch.Tensor | None = None
        self.row_starts: list[int] = []
        self.prompt_logprobs: dict[int, list[float]] = {}
        self._host: list[torch.Tensor | None] = []
        self._handles: list = []  # pinned buffers to give back once read
        self._event = None
        if out is not None:
            copies = [download(t) for t in (out.tokens, out.logprobs, out.top_ids, out.top_logprobs)]
            self._host = [host for host, _ in copies]
            self._handles = [handle for _, handle in copies]
            if device is not None and device.type != "cpu":
                self._event = torch.Event(device=device)
                self._event.record()

    def results(self) -> list[StepResult]:
        if self._event is not None:
            self._event.synchronize()
        results = [StepResult() for _ in self.scheduled]
        host: list = [t.tolist() if t is not None else None for t in self._host]
        for handle in self._handles:  # read: the pinned buffers may be reused
            release(handle)
        self._handles = []
        if self.sampling_index:
            tokens, logprobs, top_ids, top_lps = host
            sampled: dict[int, list[tuple[int, float, list]]] = {}
            for row, i in enumerate(self.sampling_index):
                n_top = self.scheduled[i].seq.params.top_n_tokens
                top = list(zip(top_ids[row][:n_top], top_lps[row][:n_top])) \
                    if top_ids is not None and n_top else []
                sampled.setdefault(i, []).append((tokens[row], logprobs[row], top))
            for i, rows in sampled.items():
                r, proposed = results[i], self.scheduled[i].spec
                n = accepted_prefix(proposed, [t for t, _, _ in rows]) if proposed else 0
                r.token, r.logprob, r.top = rows[n]
                r.accepted, r.num_proposed = rows[:n], len(proposed)
        for i, lps in self.prompt_logprobs.items():
            results[i].prompt_logprobs = lps
        return results


class FinishedStep(LaunchedStep):
    """A step that already ran to completion (backends whose launch is synchronous)."""

    def __init__(self, scheduled: list[ScheduledSeq], results: list[StepResult]):
        super().__init__(scheduled, [i for i, r in enumerate(results) if r.token is not None])
        self._results = results

    def results(self) -> list[StepResult]:
        return self._results


class ModelRunner:
    """Runs one model on one device for the engine: ``allocate_kv_cache`` once, ``warmup``
    once, then ``launch`` per scheduled batch. Backends subclass it."""

    # Whether the engine should launch the next step before reading this one's tokens. Worth
    # it where launches are asynchronous (GPUs); on CPU a launch already runs the step. The
    # class says what its launches allow; the instance attribute set in ``__init__`` is what
    # this engine does (also off under --disable-overlap-steps and for sharded engines).
    overlap_steps: bool = False
    # Whether kernels compile on first use of each variant (Triton): the server's warm-up then
    # runs every kind of step before the first request (engine/warmup.py), not just one.
    lazy_kernels: bool = False
    # Whether ``prepare``/``launch`` take verify rows (``ScheduledSeq.spec``: k + 1 query rows
    # per decoding sequence, every row sampled). Runners that replace them say False, and
    # --speculate is refused on them.
    supports_speculation: bool = True
    # Whether ``launch`` hands its forward's hidden states to the ``LaunchedStep`` (set by the
    # engine's builder for a proposer with ``needs_hidden_states``: Medusa, EAGLE). A reference
    # to the tensor the logits are computed from, so it costs no copy and no second forward.
    keep_hidden_states: bool = False

    model: CausalLM
    config: EngineConfig
    backend: RunnerBackend
    lora: LoRAManager | None

    def __init__(self, model, config: EngineConfig, backend, *, lora=None, peers: Peers | None = None):
        """``config`` is the engine's resolved, frozen configuration; ``lora`` the
        ``genserve.lora.LoRAManager`` when --lora-adapters loaded adapters (its
        ``batch_for(...)`` goes into each step's ``ForwardBatch``); ``peers`` the other
        tensor-parallel ranks, told of each forward and LM-head call (none by default)."""
        self.model, self.config, self.backend = model, config, backend
        self.device = backend.device
        self.block_size = config.block_size
        self.kv_caches: list[torch.Tensor] = []
        self.vocab_size = model.config.vocab_size
        self.last_tokens: torch.Tensor | None = None  # the latest step's sampled ids, on device
        self.lora = lora
        self.peers = peers if peers is not None else Peers()
        self.overlap_steps = type(self).overlap_steps and config.overlap_steps and self.peers.allows_overlap

    # -- KV cache -------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.model.kv_cache_spec(), self.block_size, self.kv_dtype)

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
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_lens: list[int] = []
        seq_lens: list[int] = []
        known: list[int] = []
        tables: list[list[int]] = []
        logit_rows: list[int] = []
        sampling_index: list[int] = []
        prompt_rows: dict[int, tuple[int, int]] = {}
        row_starts: list[int] = []
        ref_dst: list[int] = []  # input rows whose token is still on the device
        ref_src: list[int] = []
        bs = self.block_size
        for i, s in enumerate(scheduled):
            seq, start, n = s.seq, s.seq.num_computed, s.num_tokens
            row0 = len(ids)
            row_starts.append(row0)
            table = seq.block_table
            if s.spec:
                # Verify: the last known token, then the proposals, each row its own one-token
                # attention sequence over the same block table, row j seeing positions up to
                # start + j. Every row's K/V is written before any row attends, so this is the
                # causal attention of k + 1 query rows, and a batch of decodes and verify rows
                # stays decode-only: the decode kernels and the decode CUDA graphs serve it.
                ids += [seq.token_at(start), *s.spec]
                pos += range(start, start + n)
                slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
                q_lens += [1] * n
                seq_lens += range(start + 1, start + n + 1)
                known += [len(seq)] * n
                tables += [table] * n
                logit_rows += range(row0, row0 + n)  # every row samples: row j checks proposal j
                sampling_index += [i] * n
                continue
            if n == 1:  # decode: avoid building the whole token list every step
                if seq.num_pending:  # sampled by the step in flight: gather it on the device
                    ref_dst.append(row0)
                    ref_src.append(seq.pending_row)
                    ids.append(0)
                else:
                    ids.append(seq.token_at(start))
                pos.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids += seq.ids_between(start, start + n)
                pos += range(start, start + n)
                slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            q_lens.append(n)
            seq_lens.append(start + n)
            known.append(len(seq))
            tables.append(table)
            if seq.params.prompt_logprobs and not seq.num_generated and start < len(seq.prompt_ids):
                prompt_rows[i] = (row0, n)
            if s.completes:
                logit_rows.append(row0 + n - 1)
                sampling_index.append(i)
        T, B, S, R = len(ids), len(q_lens), len(logit_rows), len(ref_dst)  # B: attention sequences
        width = max(len(t) for t in tables)
        every_row = S == T  # decode-only: the sampler takes all rows, no gather needed

        # Two uploads per step: the int64 inputs and the int32 attention metadata.
        o_ids, o_pos, o_slots, o_rows, o_dst, o_src, longs = _pack_aligned(
            [ids, pos, slots, [] if every_row else logit_rows, ref_dst, ref_src], torch.long, self.device)
        flat_tables = []
        for tb in tables:
            flat_tables += tb
            flat_tables += [0] * (width - len(tb))
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        o_cu, o_lens, o_known, o_tables, ints = _pack_aligned([cu, seq_lens, known, flat_tables],
                                                              torch.int32, self.device)

        input_ids = longs[o_ids:o_ids + T]
        if R:
            assert self.last_tokens is not None  # pending rows exist only after a sampled step
            dst, src = longs[o_dst:o_dst + R], longs[o_src:o_src + R]
            input_ids = input_ids.index_copy(0, dst, self.last_tokens.index_select(0, src))
        attn = AttentionMetadata(
            cu_seqlens_q=ints[o_cu:o_cu + B + 1],
            seq_lens=ints[o_lens:o_lens + B],
            block_tables=ints[o_tables:o_tables + B * width].view(B, width),
            slot_mapping=longs[o_slots:o_slots + T],
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(seq_lens),
            is_decode_only=all(n == 1 for n in q_lens),
            known_lens=ints[o_known:o_known + B],
            seq_lens_cpu=seq_lens,
            query_lens_cpu=q_lens,
        )
        rows = None if every_row else longs[o_rows:o_rows + S]
        return PreparedBatch(input_ids, longs[o_pos:o_pos + T], attn, rows, sampling_index, prompt_rows,
                             row_starts)

    def sampling_batch(self, scheduled: list[ScheduledSeq], index: list[int]) -> SamplingBatch:
        seqs = [scheduled[i].seq for i in index]
        params = [s.params for s in seqs]
        # Row j of a verify row draws output index num_generated + j, the proposals before it
        # in its history: what decoding without speculation would see at that index.
        ahead = [0] * len(index)
        for row in range(1, len(index)):
            if index[row] == index[row - 1]:
                ahead[row] = ahead[row - 1] + 1
        drafts = [scheduled[i].spec[:j] for i, j in zip(index, ahead)]
        batch = SamplingBatch.for_sequences(seqs, drafts, [s.num_generated + j for s, j in zip(seqs, ahead)],
                                            self.device, self.config.watermark_gamma, self.config.watermark_delta)
        if any(p.constraint is not None for p in params):
            batch.allowed = self._grammar_mask(scheduled, index, ahead)
        return batch

    def _grammar_mask(self, scheduled: list[ScheduledSeq], index: list[int], ahead: list[int]) -> torch.Tensor:
        """[rows, vocab] bool: each constrained row's allowed tokens, all allowed elsewhere.
        Verify row j of a sequence gets the grammar's mask after its proposals 0..j-1 (which
        the speculator cut to what the grammar accepts), so a proposal the grammar forbids is
        never accepted and every row is masked as decoding would mask that index."""
        bitmask = torch.full((len(index), bitmask_words(self.vocab_size)), -1, dtype=torch.int32)
        for row, (i, j) in enumerate(zip(index, ahead)):
            constraint = scheduled[i].seq.params.constraint
            if constraint is not None and j == 0:  # a sequence's first (or only) row
                fill_verify_bitmask(constraint, bitmask, row, scheduled[i].spec)
        return unpack_bitmask(bitmask.to(self.device), self.vocab_size)

    def encoder_states(self, scheduled: list[ScheduledSeq]) -> list | None:
        """Encoder-decoder models: encode the prompts of requests at their first step (one
        batched call), then every scheduled request's state in batch order. None otherwise."""
        if not self.model.is_encoder_decoder:
            return None
        new = [s.seq for s in scheduled if s.seq.encoder_state is None]
        if new:
            prompts = [seq.encoder_ids for seq in new if seq.encoder_ids is not None]
            if len(prompts) != len(new):
                raise RuntimeError("an encoder-decoder request has no encoder prompt")
            for seq, state in zip(new, self.model.encode(prompts)):
                seq.encoder_state = state
        return [s.seq.encoder_state for s in scheduled]

    def warmup(self) -> None:
        """Prepare for serving once the KV cache is allocated, before the first step (e.g.
        tune kernels, capture graphs). Default: nothing to prepare."""

    # -- execution ------------------------------------------------------------------------
    def execute(self, input_ids, positions, batch: ForwardBatch) -> torch.Tensor:
        """The forward pass: hidden states [T, hidden] for the flat rows. Backends override
        this (e.g. to replay CUDA graphs) and call it for the steps they run eagerly; callers
        use ``forward``, which tells the other tensor-parallel ranks first. The batch's LoRA
        rows are current for the adapted layers for the forward's duration."""
        if self.lora is None:
            return self.model(input_ids, positions, batch)
        with self.lora.active(batch.lora):
            return self.model(input_ids, positions, batch)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [tokens, hidden_size] for ``input_ids``/``positions`` [tokens]:
        ``execute``, announced to ``peers`` first (every rank runs it together)."""
        with self.peers.forward(input_ids, positions, batch):
            return self.execute(input_ids, positions, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for ``hidden`` [rows, hidden_size]: the model's LM head,
        announced to ``peers`` first (a vocab-parallel LM head all-gathers over the ranks)."""
        with self.peers.logits(hidden):
            return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledSeq]) -> LaunchedStep:
        """Queue one step on the device; nothing here waits for it (except prompt logprobs)."""
        prep = self.prepare(scheduled)
        batch = ForwardBatch(prep.attn, self.kv_caches, self.encoder_states(scheduled),
                             images=image_rows(self.model, scheduled, self.device))
        if self.lora is not None:
            batch.lora = self.lora.batch_for([s.seq.params.adapter_id for s in scheduled],
                                             [s.num_tokens for s in scheduled])
        hidden = self.forward(prep.input_ids, prep.positions, batch)
        step = LaunchedStep(scheduled)
        if prep.sampling_index:
            rows = hidden if prep.logit_rows is None else hidden[prep.logit_rows]
            out: SamplerOutput = sample(self.compute_logits(rows),
                                        self.sampling_batch(scheduled, prep.sampling_index))
            self.last_tokens = out.tokens  # the next step's inputs may be gathered from these
            step = LaunchedStep(scheduled, prep.sampling_index, out, self.device)
        if self.keep_hidden_states:
            step.hidden, step.row_starts = hidden, prep.row_starts
        for i, (row0, n) in prep.prompt_rows.items():
            step.prompt_logprobs[i] = self._prompt_logprobs(scheduled[i], hidden[row0:row0 + n])
        return self.peers.finish(step)

    def _prompt_logprobs(self, s: ScheduledSeq, hidden: torch.Tensor) -> list[float]:
        """Log-probability of each prompt token given the ones before it, for the rows of this
        chunk (``hidden``: [n, hidden_size], the rows of this request only).

        Row j predicts prompt token ``start + j + 1``. The LM head and the full-vocabulary
        log-softmax run over at most ``prompt_logprobs_rows()`` rows at a time, so a long prompt
        never holds more than ``PROMPT_LOGPROBS_CHUNK_ELEMENTS`` logits: the memory is bounded
        whatever the prompt length and the prefill budget (TGI needed --enable-prefill-logprobs
        because it computed them all at once)."""
        seq, start = s.seq, s.seq.num_computed
        prompt = seq.prompt_ids
        targets = prompt[start + 1:start + s.num_tokens + 1]  # those of this chunk's rows
        if not targets:
            return []
        idx = torch.tensor(targets, device=hidden.device)
        step = self.prompt_logprobs_rows()
        picked = []
        for r0 in range(0, len(targets), step):
            # Through compute_logits: under tensor parallelism every rank makes each LM-head call.
            logprobs = self.compute_logits(hidden[r0:r0 + step]).float().log_softmax(-1)
            picked.append(logprobs.gather(1, idx[r0:r0 + step, None])[:, 0])
        return torch.cat(picked).tolist()

    def prompt_logprobs_rows(self) -> int:
        """Rows per LM-head chunk of prompt logprobs: ``PROMPT_LOGPROBS_CHUNK_ELEMENTS`` logits."""
        return max(1, PROMPT_LOGPROBS_CHUNK_ELEMENTS // self.vocab_size)
