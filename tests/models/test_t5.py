"""T5 / FLAN-T5 / mT5 (encoder-decoder) against transformers, through the engine."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MT5Config, T5Config

from genserve.testing import assert_seq2seq_matches_transformers, load_genserve


def tiny_t5(**overrides):
    # max_distance 20 < the longest prompts (52 tokens), so the far buckets saturate too.
    cfg = dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               relative_attention_num_buckets=16, relative_attention_max_distance=20,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
               pad_token_id=0, eos_token_id=1)
    cfg.update(overrides)
    return T5Config(**cfg)


def untie_lm_head(folder):
    """Make the checkpoint look like FLAN-T5's on the Hub: its own lm_head, tie_word_embeddings false."""
    weights = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    weights["lm_head.weight"] = torch.randn(weights["shared.weight"].shape, generator=g)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))


def test_flan_t5_matches_transformers(tmp_path):
    report = assert_seq2seq_matches_transformers(tiny_t5(), tmp_path, rewrite_checkpoint=untie_lm_head)
    assert report.max_logit_diff < 1e-3


@pytest.mark.parametrize("overrides", [
    {"feed_forward_proj": "relu", "tie_word_embeddings": True},  # original T5: tied, rescaled head
    # Asymmetric stacks (a deeper decoder trips transformers' own cache sizing) and inner != d_model.
    {"num_layers": 3, "num_decoder_layers": 2, "num_heads": 2, "d_kv": 24},
], ids=["t5-v1.0", "asymmetric"])
def test_t5_variants_match_transformers(tmp_path, overrides):
    report = assert_seq2seq_matches_transformers(tiny_t5(**overrides), tmp_path)
    assert report.max_logit_diff < 1e-3


def test_mt5_matches_transformers(tmp_path):
    config = MT5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    assert_seq2seq_matches_transformers(config, tmp_path, rewrite_checkpoint=untie_lm_head)


def test_t5_preemption_keeps_encoder_state(tmp_path):
    # 48 cache tokens for four 21-token decoder sequences: requests are preempted and their
    # decoder tokens recomputed (multi-row steps) against the cross K/V they kept.
    report = assert_seq2seq_matches_transformers(
        tiny_t5(), tmp_path, rewrite_checkpoint=untie_lm_head, max_batch_total_tokens=48,
        max_total_tokens=48, max_input_tokens=40)
    assert report.preemptions > 0


def test_t5_engine_reports_client_prompt(tmp_path):
    from genserve.engine.offline import OfflineRequest, iter_steps
    from genserve.engine.sampling_params import SamplingParams
    from genserve.testing import save_reference
    from transformers import AutoModelForSeq2SeqLM

    save_reference(tiny_t5(), tmp_path, model_cls=AutoModelForSeq2SeqLM)
    engine = load_genserve(tmp_path)
    assert not engine.blocks.enable_prefix_caching  # decoder blocks depend on the encoder input
    request = OfflineRequest([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=3, ignore_eos=True))
    outs = [o for step in iter_steps(engine, [request]) for o in step]
    assert [o.num_prompt_tokens for o in outs] == [5, 5, 5]
    assert outs[-1].finished and outs[-1].num_generated == 3
