"""Paged KV-cache bookkeeping with prefix caching.

The cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence owns a list of
block ids (its block table). A full block is identified by a chain hash of its tokens and
every token before it, so requests sharing a prompt prefix share those blocks. The chain starts
from the request's *cache salt*: whatever besides the tokens decides a block's KV (the LoRA
adapter, whose k/v projections change it), so two requests share cached blocks only when they
share the adapter too. Freed blocks keep their contents and stay findable until they are reused
(least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

from genserve.engine.sequence import Sequence


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None
    tokens: tuple[int, ...] = field(default=())


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.hits = 0  # prefix-cache statistics, in tokens
        self.queries = 0

    # -- accounting ----------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def chain_hash(prev: Hashable, tokens: tuple[int, ...]) -> int:
        """The hash of a full block: its tokens and ``prev``, the hash of the block before it
        (for the first block: the sequence's ``cache_salt``)."""
        return hash((prev, tokens))

    @staticmethod
    def cache_salt(seq: Sequence) -> Hashable:
        """What the first block's hash chains from: None for the base model, the adapter's id
        for a LoRA request (an adapted k/v projection gives the same tokens other KV), and
        the hash of the prompt's images when it has some (every image is the same run of
        placeholder tokens, so the tokens alone cannot tell two images apart)."""
        adapter = seq.params.adapter_id
        salt = None if adapter is None else ("lora", adapter)
        mm = seq.params.multimodal
        return salt if mm is None else (salt, "images", mm.content_hash)

    # -- allocation ----------------------------------------------------------------------
    def _take_free(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.tokens, block.ref_count = None, (), 1
        return block

    def _prefix_hits(self, ids: list[int], salt: Hashable) -> list[int]:
        """Cached block ids for the leading full blocks of ``ids`` (chained from ``salt``),
        leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        prev: Hashable = salt
        max_blocks = (len(ids) - 1) // self.block_size  # the last token is always computed
        for b in range(max_blocks):
            tokens = tuple(ids[b * self.block_size:(b + 1) * self.block_size])
            h = self.chain_hash(prev, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            hits.append(block_id)
            prev = h
        return hits

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        ids = seq.all_ids
        hits = [] if seq.params.prompt_logprobs and not seq.output_ids \
            else self._prefix_hits(ids, self.cache_salt(seq))
        reusable_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        needed = self.blocks_needed(len(ids)) - len(hits) + reusable_free
        return needed + reserve <= self.num_free

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table, "sequence already holds blocks"
        ids = seq.all_ids
        # Prompt logprobs need every prompt row computed, so such requests skip the cache.
        wants_rows = seq.params.prompt_logprobs and not seq.output_ids
        hits = [] if wants_rows else self._prefix_hits(ids, self.cache_salt(seq))
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        seq.block_table = list(hits)
        for _ in range(self.blocks_needed(len(ids)) - len(hits)):
            seq.block_table.append(self._take_free().id)
        seq.num_computed = seq.num_cached = len(hits) * self.block_size
        self.queries += len(ids)
        self.hits += seq.num_cached

    def can_append(self, seq: Sequence, lookahead: int = 0) -> bool:
        """Room for one more token (the next decode step), plus ``lookahead`` speculative
        positions after it (a verify step, spec_decode/)?"""
        return self.blocks_needed(len(seq) + lookahead) - len(seq.block_table) <= self.num_free

    def append_slot(self, seq: Sequence, lookahead: int = 0) -> None:
        """Blocks for the sequence's tokens and ``lookahead`` positions after them."""
        while len(seq) + lookahead > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_free().id)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks past the first ``num_tokens`` positions: those a verify step held
        for speculative tokens that were rejected. They were taken fresh by ``append_slot``
        (never shared, never hashed), so they go back to the free list with no cached content."""
        keep = self.blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block.id] = None

    def free_seq(self, seq: Sequence) -> None:
        # Release last blocks first so a sequence's prefix stays cached longest.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = 0

    def mark_computed(self, seq: Sequence, start: int, end: int) -> None:
        """Publish the hashes of blocks that became full and computed by a step that computed
        positions ``start .. end - 1`` (all real token ids by the time it is called)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, last = start // bs, end // bs
        if first == last:
            return
        prev: Hashable = self.blocks[seq.block_table[first - 1]].hash if first > 0 else self.cache_salt(seq)
        for b in range(first, last):
            block = self.blocks[seq.block_table[b]]
            tokens = tuple(seq.ids_between(b * bs, (b + 1) * bs))  # not all_ids: O(block) per block
            if block.hash is None:
                block.hash, block.tokens = self.chain_hash(prev, tokens), tokens
                self.cached.setdefault(block.hash, block.id)
            prev = block.hash

    def reset_prefix_cache(self) -> None:
        self.cached.clear()
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash, block.tokens = None, ()
