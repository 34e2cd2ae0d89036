"""``GaudiModelRunner``: lazy-mode execution with HPU graphs for decode.

In lazy mode (Gaudi's default PyTorch mode) ops queue up on the host and run when
``mark_step`` cuts the graph: the runner calls it right after the forward pass so the forward
is compiled and cached as one graph and the sampler's ops form a separate one.

Decode steps are padded to a ``(batch, block-table width)`` bucket and replayed from an HPU
graph captured by ``habana_frameworks.torch.hpu.wrap_in_hpu_graph``, which keys its graphs
on input tensor shapes. Its wrapper hashes only tensors, lists, tuples and dicts, so the
captured module takes plain tensors and rebuilds the attention metadata inside. Prefill and
mixed steps run un-graphed in lazy mode.

Not run on Gaudi (none here): on CPU the tests run this runner end to end with the Habana
calls swapped for stand-ins and compare tokens against the plain CPU runner.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from genserve.attention.base import AttentionMetadata
from genserve.distributed.state import get_tp_group
from genserve.engine.model_runner import ModelRunner, PreparedBatch
from genserve.engine.scheduler import ScheduledSeq
from genserve.models.base import ForwardBatch
from genserve_gaudi.attention import HpuPagedAttention
from genserve_gaudi.padding import bucket_for, padded_decode_batch, powers_of_two_upto

logger = logging.getLogger(__name__)


class DecodeStep(nn.Module):
    """The forward of a padded decode batch, taking tensors only (what HPU graphs capture)."""

    def __init__(self, model, kv_caches: list[torch.Tensor]):
        super().__init__()
        self.model = model
        self.kv_caches = kv_caches  # captured by address; written in place every step

    def forward(self, input_ids, positions, cu_seqlens_q, seq_lens, block_tables, slot_mapping):
        width = block_tables.shape[1]
        attn = AttentionMetadata(
            cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, block_tables=block_tables,
            slot_mapping=slot_mapping, max_seqlen_q=1,
            max_seqlen_k=width * self.kv_caches[0].shape[2], is_decode_only=True,
        )
        return self.model(input_ids, positions, ForwardBatch(attn, self.kv_caches))


class GaudiModelRunner(ModelRunner):
    supports_speculation = False  # its own padded prepare/launch take no verify rows

    def __init__(self, model, config, backend, *, lora=None, peers=None):
        super().__init__(model, config, backend, lora=lora, peers=peers)
        self.api = backend.api
        self.pad_block = -1
        self.graph_batch_sizes = backend.graph_sizes(config.scheduler.max_batch_size)
        attention_cls = model.ctx.attention_cls
        why_not = None
        if lora is not None:  # DecodeStep's graph takes no per-row adapters: it would drop them
            why_not = "LoRA adapters (HPU graphs are captured without per-row adapters)"
        elif not issubclass(attention_cls, HpuPagedAttention):
            why_not = f"attention {attention_cls.name} is not hpu_paged"
        elif not self.api.is_lazy():
            why_not = "not in lazy mode (PT_HPU_LAZY_MODE=1)"
        elif get_tp_group().size > 1 and os.environ.get("PT_HPU_ENABLE_LAZY_COLLECTIVES") != "true":
            # Habana: HPU graphs that contain collectives need lazy collectives.
            why_not = "tensor parallel without PT_HPU_ENABLE_LAZY_COLLECTIVES=true"
        self.use_graphs = bool(self.graph_batch_sizes) and why_not is None
        if self.graph_batch_sizes and why_not:
            logger.info("gaudi: HPU graphs off: %s", why_not)
        self._decode = None
        self.graph_buckets: set[tuple[int, int]] = set()  # (batch, width) run so far

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """One block more than the block manager knows: the scratch block pad rows write to."""
        super().allocate_kv_cache(num_blocks + 1)
        self.pad_block = num_blocks
        if self.use_graphs:
            self._decode = self.api.wrap_in_hpu_graph(DecodeStep(self.model, self.kv_caches))

    def width_buckets(self) -> tuple[int, ...]:
        return powers_of_two_upto(-(-self.config.max_total_tokens // self.block_size))

    def prepare(self, scheduled: list[ScheduledSeq]) -> PreparedBatch:
        batch = bucket_for(len(scheduled), self.graph_batch_sizes)
        if self._decode is None or batch is None or any(s.num_tokens != 1 for s in scheduled):
            return super().prepare(scheduled)
        need = max(-(-(s.seq.num_computed + 1) // self.block_size) for s in scheduled)
        width = bucket_for(need, self.width_buckets())
        return padded_decode_batch(scheduled, batch, width, self.block_size, self.pad_block, self.device)

    def graphable(self, attn: AttentionMetadata) -> bool:
        """A decode batch at a captured (batch, width) shape. Decided from shapes alone, so
        tensor-parallel workers (which get the metadata without ``extra``) decide alike."""
        batch, width = attn.block_tables.shape
        return (self._decode is not None and attn.is_decode_only
                and batch in self.graph_batch_sizes and width in self.width_buckets())

    def execute(self, input_ids, positions, batch: ForwardBatch) -> torch.Tensor:
        a = batch.attn
        # Encoder-decoder models need their per-request encoder states, image rows their
        # embeddings: not graphed.
        if batch.encoder is None and batch.images is None and self.graphable(a):
            self.graph_buckets.add(tuple(a.block_tables.shape))
            hidden = self._decode(input_ids, positions, a.cu_seqlens_q, a.seq_lens,
                                  a.block_tables, a.slot_mapping)
        else:
            hidden = super().execute(input_ids, positions, batch)
        self.api.mark_step()
        return hidden

    def warmup(self) -> None:
        """Capture every decode graph before serving: all-padding batches (scratch writes only)."""
        if self._decode is None:
            return
        with torch.inference_mode():
            for batch in self.graph_batch_sizes:
                for width in self.width_buckets():
                    prep = padded_decode_batch([], batch, width, self.block_size, self.pad_block,
                                               self.device)
                    self.execute(prep.input_ids, prep.positions, ForwardBatch(prep.attn, self.kv_caches))
        self.api.synchronize()
        logger.info("gaudi: %d HPU graphs captured", len(self.graph_buckets))
