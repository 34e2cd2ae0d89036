"""--kv-cache-dtype: an fp8 cache holds K/V at 1 byte and serves on the CPU path too."""

import torch
from transformers import LlamaConfig

from genserve.testing import generate_greedy, load_genserve, make_prompts, prompt_logits, save_reference


def test_fp8_kv_cache_logits_close_to_full_precision(tmp_path):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    save_reference(config, tmp_path)
    full, fp8 = load_genserve(tmp_path), load_genserve(tmp_path, kv_cache_dtype="fp8")
    assert fp8.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    assert fp8.runner.kv_caches[0].element_size() == 1
    for prompt in make_prompts(256, lengths=(7, 30)):
        a, b = prompt_logits(full, prompt), prompt_logits(fp8, prompt)
        # K/V rounded to 3 mantissa bits: logits move by a few percent of their range, no more.
        assert (a - b).abs().max() <= 0.06 * a.abs().max()
        assert not torch.equal(a, b)  # the cache really is fp8
    out = generate_greedy(fp8, make_prompts(256, lengths=(9, 21)), 12)
    assert [len(o) for o in out] == [12, 12]
