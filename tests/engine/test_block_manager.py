"""Paged KV-cache bookkeeping: allocation, prefix reuse, eviction order, freeing."""

import pytest

from genserve.engine.block_manager import BlockManager
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.sequence import Sequence


def seq(ids, rid="r", **params):
    return Sequence(rid, list(ids), SamplingParams(**params))


def test_allocate_covers_every_token_and_free_returns_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free == 5
    assert s.num_computed == 0
    bm.free_seq(s)
    assert bm.num_free == 8 and s.block_table == []


def test_prefix_blocks_are_shared_once_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(12), "a")
    bm.allocate(a)
    a.num_computed = 12
    bm.mark_computed(a, 0, a.num_computed)
    b = seq(list(range(8)) + [99, 98, 97], "b")
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]  # two full shared blocks
    assert b.block_table[2] != a.block_table[2]
    assert b.num_computed == b.num_cached == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2


def test_uncomputed_blocks_are_never_shared():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(12), "a")
    bm.allocate(a)  # not computed yet: no hashes published
    b = seq(range(12), "b")
    bm.allocate(b)
    assert set(a.block_table).isdisjoint(b.block_table)


def test_full_hit_still_computes_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(8), "a")
    bm.allocate(a)
    a.num_computed = 8
    bm.mark_computed(a, 0, a.num_computed)
    b = seq(range(8), "b")
    bm.allocate(b)
    assert b.num_computed == 4  # the second block is recomputed so the last token has logits


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    bm.allocate(a)
    a.num_computed = 5
    bm.mark_computed(a, 0, a.num_computed)
    bm.free_seq(a)
    again = seq([1, 2, 3, 4, 9], "again")
    bm.allocate(again)
    assert again.num_cached == 4
    bm.free_seq(again)
    # Filling the whole cache evicts the cached blocks.
    other = seq([7] * 8, "other")
    bm.allocate(other)
    assert bm.num_free == 0
    bm.free_seq(other)
    late = seq([1, 2, 3, 4, 5], "late")
    bm.allocate(late)
    assert late.num_cached == 0


def test_append_slot_grows_only_at_block_boundaries():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq(range(4))
    bm.allocate(s)
    s.num_computed = 4
    s.output_ids.append(5)  # 5 tokens now: needs a second block
    assert bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2
    s.output_ids.append(6)
    bm.append_slot(s)
    assert len(s.block_table) == 2


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(12), "a")
    bm.allocate(a)
    a.num_computed = 12
    bm.mark_computed(a, 0, a.num_computed)
    b = seq(range(12), "b", prompt_logprobs=True)
    bm.allocate(b)
    assert b.num_cached == 0


def test_zero_blocks_is_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_blocks_are_shared_only_under_the_same_adapter():
    """The hash chain starts from the request's adapter: same tokens, other adapter, no hit."""
    bm = BlockManager(num_blocks=32, block_size=4)

    def computed(s):
        bm.allocate(s)
        s.num_computed = len(s.prompt_ids)
        bm.mark_computed(s, 0, s.num_computed)
        return s

    a = computed(seq(range(9), "a", adapter_id="alpha"))
    assert computed(seq(range(9), "b", adapter_id="beta")).num_cached == 0
    assert computed(seq(range(9), "c")).num_cached == 0
    d = computed(seq(range(9), "d", adapter_id="alpha"))
    assert d.num_cached == 8 and d.block_table[:2] == a.block_table[:2]
