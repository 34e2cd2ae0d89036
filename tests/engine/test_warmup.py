"""The warm-up runs every kind of step serving will see: a long fresh prompt, decoding over
its context, a batch of short fresh prompts, and a prompt joining a running sequence."""

from transformers import LlamaConfig

from genserve.engine.warmup import warm_up
from genserve.testing import load_genserve, save_reference


def tiny_config():
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def test_warm_up_covers_every_step_kind(tmp_path):
    config = tiny_config()
    save_reference(config, tmp_path)
    engine = load_genserve(tmp_path, max_input_tokens=200, max_total_tokens=256)
    runner = engine.runner
    runner.lazy_kernels = True  # as a GPU runner says
    seen = []
    execute = runner.execute

    def record(input_ids, positions, batch):
        m = batch.attn
        seen.append((list(m.seq_lens_cpu), list(m.query_lens_cpu)))
        return execute(input_ids, positions, batch)

    runner.execute = record
    warm_up(engine, config.vocab_size)

    chunk = engine.config.scheduler.max_batch_prefill_tokens
    fresh = [(s, q) for s, q in seen if s == q]
    assert any(q == [chunk] for _, q in fresh), "no long fresh prompt filling a prefill chunk"
    assert any(sorted(q) == [5, chunk // 2] for _, q in fresh), "no long fresh prompt beside a short one"
    assert any(len(q) >= 4 and max(q) > 1 for _, q in fresh), "no batch of short fresh prompts"
    assert any(q == [1] and s[0] > chunk for s, q in seen), "no decode over the long context"
    assert any(s != q and max(q) > 1 and min(q) == 1 for s, q in seen), "no mixed prefill + decode step"
    assert not engine.has_work
    assert engine.blocks.num_free == engine.blocks.num_blocks, "warm-up left KV blocks held"


def test_quick_warm_up_without_lazy_kernels(tmp_path):
    config = tiny_config()
    save_reference(config, tmp_path)
    engine = load_genserve(tmp_path)
    steps = []
    engine.runner.execute = lambda *a, _e=engine.runner.execute: steps.append(1) or _e(*a)
    warm_up(engine, config.vocab_size)
    assert 1 <= len(steps) <= 3 and not engine.has_work
