"""``NeuronModelRunner``: every forward pass at a bucket's static shape.

A step's sequences are split into a decode group (one new token each) and a prefill group,
each cut into pieces of at most the largest batch bucket; each piece is padded on the host
to its bucket (``genserve_neuron.padding``) and run as one forward. The model and KV cache
live on the Neuron (XLA) device; batch building and sampling run on the host, so the only
device graphs are the forward passes (one per bucket, compiled on first use or by
``warmup``) and the logits projection of each sequence's last row.

Not run on Neuron hardware (none here): on CPU the tests run this runner end to end with
the device calls swapped for no-ops and compare tokens against the plain CPU runner.
"""

from __future__ import annotations

import logging

import torch

from genserve.engine.model_runner import FinishedStep, ModelRunner, StepResult
from genserve.engine.sampler import sample
from genserve.engine.scheduler import ScheduledSeq
from genserve.models.base import ForwardBatch
from genserve_neuron.buckets import Bucket
from genserve_neuron.padding import PaddedBatch, SeqChunk, blocks_needed, pad_batch

logger = logging.getLogger(__name__)


class NeuronModelRunner(ModelRunner):
    supports_speculation = False  # its own padded prepare/launch take no verify rows

    def __init__(self, model, config, backend, *, lora=None, peers=None):
        if model.is_encoder_decoder:
            raise NotImplementedError("backend 'neuron' serves decoder-only models; "
                                      f"{type(model).__name__} is encoder-decoder")
        if lora is not None:  # its padded forwards carry no per-row adapters
            raise NotImplementedError("backend 'neuron' does not apply LoRA adapters (--lora-adapters)")
        if model.image_token_id is not None:  # nor image rows
            raise NotImplementedError("backend 'neuron' does not run vision-language models "
                                      f"({type(model).__name__})")
        super().__init__(model, config, backend, lora=lora, peers=peers)
        self.compute_device = backend.device
        # Batches are built and sampled on the host; only the forward runs on the device.
        self.device = torch.device("cpu")
        self.buckets = backend.buckets(config)
        self.pad_block = -1
        self.buckets_run: set[Bucket] = set()  # one compiled graph each
        logger.info("neuron buckets: decode batch %s, prefill batch %s, prefill len %s, "
                    "context blocks %s: %d graphs", self.buckets.decode_batch,
                    self.buckets.prefill_batch, self.buckets.prefill_len,
                    self.buckets.context_blocks, len(self.buckets.all()))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One block more than the block manager knows: the scratch block pad rows write to."""
        spec = self.model.kv_cache_spec()
        shape = (2, num_blocks + 1, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.kv_dtype, device=self.compute_device)
                          for _ in range(spec.num_layers)]
        self.pad_block = num_blocks

    # -- grouping and padding ---------------------------------------------------------------
    def groups(self, scheduled: list[ScheduledSeq]) -> list[list[int]]:
        """Scheduled indices per forward pass: decodes apart from prefills, cut to fit a bucket."""
        decode = [i for i, s in enumerate(scheduled) if s.num_tokens == 1]
        prefill = [i for i, s in enumerate(scheduled) if s.num_tokens > 1]
        out = []
        for idx, cap in ((decode, self.buckets.max_decode_batch),
                         (prefill, self.buckets.max_prefill_batch)):
            out += [idx[k:k + cap] for k in range(0, len(idx), cap)]
        return out

    def pad(self, scheduled: list[ScheduledSeq], indices: list[int]) -> PaddedBatch:
        chunks = []
        for i in indices:
            s = scheduled[i]
            start = s.seq.num_computed
            chunks.append(SeqChunk(s.seq.all_ids[start:start + s.num_tokens], start, s.seq.block_table))
        bucket = self.buckets.pick(len(chunks), max(len(c.token_ids) for c in chunks),
                                   max(blocks_needed(c.seq_len, self.block_size) for c in chunks))
        return pad_batch(chunks, bucket, self.block_size, self.pad_block)

    # -- execution ------------------------------------------------------------------------
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head, run as soon as it is traced. Under tensor parallelism it all-gathers,
        and a worker (which only mirrors forward and compute_logits) never reads the result
        that would otherwise make XLA run it."""
        logits = super().compute_logits(hidden)
        self.backend.mark_step()
        return logits

    def execute(self, input_ids, positions, batch: ForwardBatch) -> torch.Tensor:
        """The forward, then cut the graph: compiled once per bucket, then cached."""
        hidden = super().execute(input_ids, positions, batch)
        self.backend.mark_step()
        return hidden

    def run_padded(self, padded: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward at the bucket's shape: (hidden [B*Q, hidden], last-row logits [B, V]) on device."""
        b = padded.to(self.compute_device)
        self.buckets_run.add(padded.bucket)
        hidden = self.forward(b.input_ids, b.positions, ForwardBatch(b.attn, self.kv_caches))
        Q = padded.bucket.q_len
        last = hidden.view(padded.bucket.batch, Q, -1)[:, Q - 1]  # right-aligned: each last token
        return hidden, self.compute_logits(last)

    def warmup(self) -> None:
        """Compile every bucket before serving: an all-padding batch per bucket (writes only
        to the scratch block)."""
        with torch.inference_mode():
            for bucket in self.buckets.all():
                self.run_padded(pad_batch([], bucket, self.block_size, self.pad_block))
        self.backend.synchronize()

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledSeq]) -> FinishedStep:
        results = [StepResult() for _ in scheduled]
        sampled: dict[int, torch.Tensor] = {}  # scheduled index -> logits row (host)
        for indices in self.groups(scheduled):
            padded = self.pad(scheduled, indices)
            hidden, logits = self.run_padded(padded)
            logits = logits.float().cpu()
            for j, i in enumerate(indices):
                s = scheduled[i]
                if s.completes:
                    sampled[i] = logits[j]
                seq = s.seq
                if seq.params.prompt_logprobs and not seq.output_ids and s.seq.num_computed < len(seq.prompt_ids):
                    rows = hidden[padded.real_rows(j, s.num_tokens)]
                    results[i].prompt_logprobs = self._prompt_logprobs(s, rows)
        if sampled:
            index = sorted(sampled)
            out = sample(torch.stack([sampled[i] for i in index]), self.sampling_batch(scheduled, index))
            fill_sampled(results, scheduled, index, out)
        return self.peers.finish(FinishedStep(scheduled, results))


def fill_sampled(results, scheduled, index, out) -> None:
    """Copy sampler output rows into the step results (as ``LaunchedStep.results`` does)."""
    tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    for row, i in enumerate(index):
        r = results[i]
        r.token, r.logprob = tokens[row], logprobs[row]
        n_top = scheduled[i].seq.params.top_n_tokens
        if top_ids is not None and n_top:
            r.top = list(zip(top_ids[row][:n_top], top_lps[row][:n_top]))
