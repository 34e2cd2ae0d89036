"""Our Falcon equals transformers' on tiny random configs, in each of its layouts."""

import pytest
from transformers import FalconConfig

from genserve.testing import assert_matches_transformers, make_prompts


def tiny_falcon(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512)
    cfg.update(overrides)
    return FalconConfig(**cfg)


@pytest.mark.parametrize("overrides", [
    # Falcon-7B: one KV head, parallel attention and MLP from one norm, no biases, rotary.
    {"multi_query": True, "parallel_attn": True, "bias": False},
    # Falcon-40B/180B: 8 query heads in 2 KV groups, separate ln_attn/ln_mlp, untied head.
    {"new_decoder_architecture": True, "num_attention_heads": 8, "num_kv_heads": 2,
     "tie_word_embeddings": False},
    # Falcon2-11B: the new architecture with a single norm before attention and MLP.
    {"new_decoder_architecture": True, "num_attention_heads": 8, "num_kv_heads": 2,
     "num_ln_in_parallel_attn": 1},
], ids=["7b-multi-query", "40b-grouped-kv", "11b-one-norm"])
def test_falcon_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_falcon(**overrides), tmp_path)
    assert report.prefix_cache_hit_tokens > 0


def test_falcon_rw_alibi_matches_transformers(tmp_path):
    # Falcon-RW: ALiBi instead of rotary, full multi-head qkv, sequential blocks with biases.
    # The 70-token prompt makes ALiBi's distances span many 4-token blocks and two prefill chunks.
    config = tiny_falcon(alibi=True, multi_query=False, parallel_attn=False, bias=True)
    report = assert_matches_transformers(config, tmp_path, prompts=make_prompts(256, lengths=(5, 23, 9, 70)))
    assert report.prefix_cache_hit_tokens > 0
