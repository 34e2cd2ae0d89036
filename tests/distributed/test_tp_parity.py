"""A model sharded over 2 ranks (gloo, CPU) computes what the unsharded one does."""

import pytest

from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.executor.shard_workers import ShardWorkers
from genserve.engine.sampling_params import SamplingParams
from genserve.testing import generate_greedy, load_genserve, make_prompts, prompt_logits, save_reference

from .conftest import tiny_llama


def sampled_with_details(engine, prompt):
    """Seeded sampling with top-n and prompt logprobs: the LM head runs once more per request."""
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.8, seed=7, top_n_tokens=3,
                            prompt_logprobs=True, ignore_eos=True)
    out = run_to_completion(engine, [OfflineRequest(prompt, params)])[0]
    tokens = out.outputs[0]
    top_ids = [[i for i, _ in top] for top in tokens.top_logprobs]
    return tokens.token_ids, tokens.logprobs + out.prompt_logprobs[1:], top_ids


def assert_sharded_matches(config, folder, build_sharded, new_tokens=20):
    save_reference(config, folder)
    prompts = make_prompts(config.vocab_size)
    plain = load_genserve(folder)
    sharded = build_sharded(folder)
    assert isinstance(sharded.runner.peers, ShardWorkers)
    # Composed, not patched: the backend's own runner class, the model's own LM head.
    assert type(sharded.runner) is type(plain.runner) and "compute_logits" not in vars(sharded.runner.model)
    assert not sharded.runner.overlap_steps  # the supervisor vouches for each step

    for p in prompts:
        diff = (prompt_logits(sharded, p) - prompt_logits(plain, p)).abs().max().item()
        assert diff < 1e-4, f"sharded logits differ by {diff:.2e} for a prompt of {len(p)} tokens"
    want = [generate_greedy(plain, [p], new_tokens)[0] for p in prompts]
    assert [generate_greedy(sharded, [p], new_tokens)[0] for p in prompts] == want
    # Requests joining mid-flight: mixed prefill/decode batches, chunked prefill, prefix-cache hits.
    assert generate_greedy(sharded, prompts, new_tokens, join_every=3) == want
    assert sharded.blocks.hits > 0

    ids, logprobs, tops = sampled_with_details(sharded, prompts[1])
    want_ids, want_logprobs, want_tops = sampled_with_details(plain, prompts[1])
    assert ids == want_ids and tops == want_tops
    assert len(logprobs) == len(want_logprobs) > len(ids)
    assert logprobs == pytest.approx(want_logprobs, abs=1e-4)
    return sharded


@pytest.mark.parametrize("overrides", [
    {},
    # One KV head for two ranks (replicated), tied LM head, a vocabulary that does not split evenly.
    {"num_key_value_heads": 1, "tie_word_embeddings": True, "vocab_size": 251},
], ids=["gqa", "mqa-tied-odd-vocab"])
def test_sharded_llama_matches_unsharded(tmp_path, build_sharded, overrides):
    config = tiny_llama(**overrides)
    sharded = assert_sharded_matches(config, tmp_path, build_sharded)

    model = sharded.runner.model  # rank 0 holds its half, not a replica
    assert model.lm_head.weight.shape[0] == -(-config.vocab_size // 2)
    assert model.layers[0].mlp.gate_up_proj.weight.shape[0] == config.intermediate_size
    assert model.kv_cache_spec().num_kv_heads == max(1, config.num_key_value_heads // 2)

    worker = sharded.runner.peers.supervisor.procs[1]
    sharded.runner.peers.shutdown()
    assert worker.exitcode == 0, "the worker did not stop cleanly when told to"


def test_sharded_mixtral_matches_unsharded(tmp_path, build_sharded):
    pytest.importorskip("genserve.models.mixtral",
                        reason="core/genserve/models/mixtral.py (Mixtral + layers/moe.py) has not landed")
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                           tie_word_embeddings=False)
    sharded = assert_sharded_matches(config, tmp_path, build_sharded)
    moe = sharded.runner.model.layers[0].mlp
    assert moe.w2_weight.shape[-1] == config.intermediate_size // 2  # experts split by intermediate
