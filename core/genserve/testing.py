"""Checking an architecture plugin against Hugging Face transformers.

Any plugin author can call these from a test::

    from genserve.testing import assert_matches_transformers
    def test_my_model(tmp_path):
        assert_matches_transformers(MyConfig(...tiny...), tmp_path)

The reference model is built from the config with random weights and saved as safetensors;
genserve loads that checkpoint through its real loader and registry, then both are compared:
full-prompt logits, and greedy tokens for single requests and for a continuously batched mix
(requests joining mid-flight, chunked prefill, prefix-cache hits, a small paged cache).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genserve.args import defaults
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.sequence import Sequence
from genserve.engine.scheduler import ScheduledSeq
from genserve.executor import create_engine
from genserve.models.base import ForwardBatch


@dataclass
class ParityReport:
    max_logit_diff: float
    greedy_single: list[list[int]]
    greedy_batched: list[list[int]]
    reference: list[list[int]]
    preemptions: int = 0
    prefix_cache_hit_tokens: int = 0


def save_reference(config, folder: Path, seed: int = 0, model_cls=None):
    """Build the transformers model for ``config`` with random weights; save it to ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cls: Any = model_cls or AutoModelForCausalLM
    model = cls.from_config(config, dtype=torch.float32) if hasattr(cls, "from_config") \
        else cls(config)
    model = model.float().eval()
    # Random init leaves some norms at exactly 1 and biases at 0: perturb every tensor so a
    # weight that is loaded into the wrong place cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def load_genserve(folder: Path, **flags):
    """A genserve engine for the checkpoint in ``folder`` (CPU, fp32, small paged cache);
    ``num_shard=2`` gives a sharded one (stop its workers with ``engine.runner.peers.shutdown()``)."""
    args = defaults(model_id=str(folder), backend="cpu", dtype="float32", **{
        "block_size": 4, "max_batch_total_tokens": 4096, "max_batch_prefill_tokens": 64, **flags})
    return create_engine(args).engine


@torch.inference_mode()
def prompt_logits(engine, prompt: list[int]) -> torch.Tensor:
    """genserve's logits for every prompt position, through the paged cache."""
    seq = Sequence("logits-probe", list(prompt), SamplingParams(max_new_tokens=1))
    engine.blocks.allocate(seq)
    seq.num_computed = 0  # compute every row, even prefix-cache hits
    try:
        runner = engine.runner
        prep = runner.prepare([ScheduledSeq(seq, len(prompt))])
        hidden = runner.forward(prep.input_ids, prep.positions, ForwardBatch(prep.attn, runner.kv_caches))
        return runner.compute_logits(hidden).float()
    finally:
        engine.blocks.free_seq(seq)


def generate_greedy(engine, prompts: list[list[int]], max_new_tokens: int,
                    join_every: int = 0) -> list[list[int]]:
    """Greedy outputs; with ``join_every`` > 0, request i joins after i * join_every steps."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    requests = [OfflineRequest(p, params, join_step=i * join_every) for i, p in enumerate(prompts)]
    return [r.outputs[0].token_ids for r in run_to_completion(engine, requests)]


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def make_prompts(vocab_size: int, lengths=(5, 23, 9, 40), shared_prefix: int = 12, seed: int = 1):
    """Prompts of mixed lengths; the last two share a prefix so the prefix cache is exercised."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab_size) for _ in range(shared_prefix)]
    prompts = []
    for i, n in enumerate(lengths):
        body = [rng.randrange(3, vocab_size) for _ in range(n)]
        prompts.append(prefix + body if i >= len(lengths) - 2 else body)
    return prompts


def assert_matches_transformers(config, folder: Path, *, max_new_tokens: int = 20, atol: float = 1e-3,
                                prompts: list[list[int]] | None = None, model_cls=None,
                                **flags) -> ParityReport:
    """Fail unless genserve's model equals transformers' on ``config`` (random weights, fp32)."""
    folder = Path(folder)
    ref = save_reference(config, folder, model_cls=model_cls)
    engine = load_genserve(folder, **flags)
    prompts = prompts or make_prompts(config.vocab_size)

    worst = 0.0
    for p in prompts:
        ours = prompt_logits(engine, p)
        with torch.inference_mode():
            theirs = ref(torch.tensor([p])).logits[0].float()
        diff = (ours - theirs).abs().max().item()
        worst = max(worst, diff)
        assert diff <= atol, f"logits differ by {diff:.2e} (> {atol}) for a prompt of {len(p)} tokens"

    expected = [reference_greedy(ref, p, max_new_tokens) for p in prompts]
    single = [generate_greedy(engine, [p], max_new_tokens)[0] for p in prompts]
    batched = generate_greedy(engine, prompts, max_new_tokens, join_every=3)
    for i, want in enumerate(expected):
        assert single[i] == want, f"prompt {i}: greedy tokens differ alone\n ours {single[i]}\n hf   {want}"
        assert batched[i] == want, f"prompt {i}: greedy tokens differ in the batch\n ours {batched[i]}\n hf   {want}"
    return ParityReport(worst, single, batched, expected, engine.scheduler.num_preemptions,
                        engine.blocks.hits)


# -- encoder-decoder models ---------------------------------------------------------------------

@torch.inference_mode()
def seq2seq_logits(engine, prompt: list[int], decoder_ids: list[int]) -> torch.Tensor:
    """genserve's decoder logits for every position of ``decoder_ids`` given ``prompt``."""
    seq = Sequence("logits-probe", list(decoder_ids), SamplingParams(max_new_tokens=1))
    seq.encoder_ids = list(prompt)
    engine.blocks.allocate(seq)
    seq.num_computed = 0
    try:
        runner = engine.runner
        scheduled = [ScheduledSeq(seq, len(decoder_ids))]
        prep = runner.prepare(scheduled)
        batch = ForwardBatch(prep.attn, runner.kv_caches, runner.encoder_states(scheduled))
        hidden = runner.forward(prep.input_ids, prep.positions, batch)
        return runner.compute_logits(hidden).float()
    finally:
        engine.blocks.free_seq(seq)


@torch.inference_mode()
def reference_seq2seq_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=model.config.pad_token_id, eos_token_id=None)
    return out[0, 1:].tolist()  # drop the decoder start token


def assert_seq2seq_matches_transformers(config, folder: Path, *, max_new_tokens: int = 20,
                                        atol: float = 1e-3, prompts: list[list[int]] | None = None,
                                        model_cls=None, rewrite_checkpoint=None, **flags) -> ParityReport:
    """``assert_matches_transformers`` for encoder-decoder models (T5-like).

    Prompts feed the encoder; the decoder starts from the model's start token. Compares decoder
    logits over the reference's own greedy continuation (teacher forcing), then greedy tokens
    alone and continuously batched. ``rewrite_checkpoint(folder)`` may edit the saved checkpoint
    (e.g. add an untied LM head) before both sides load it from disk.
    """
    from transformers import AutoModelForSeq2SeqLM

    folder = Path(folder)
    cls = model_cls or AutoModelForSeq2SeqLM
    save_reference(config, folder, model_cls=cls)
    if rewrite_checkpoint is not None:
        rewrite_checkpoint(folder)
    ref = cls.from_pretrained(folder, dtype=torch.float32).eval()
    engine = load_genserve(folder, **flags)
    prompts = prompts or make_prompts(config.vocab_size)
    start = engine.decoder_start_token_id

    expected = [reference_seq2seq_greedy(ref, p, max_new_tokens) for p in prompts]
    worst = 0.0
    for p, want in zip(prompts, expected):
        decoder_ids = [start] + want[:-1]
        ours = seq2seq_logits(engine, p, decoder_ids)
        with torch.inference_mode():
            theirs = ref(input_ids=torch.tensor([p]), decoder_input_ids=torch.tensor([decoder_ids])).logits[0]
        diff = (ours - theirs.float()).abs().max().item()
        worst = max(worst, diff)
        assert diff <= atol, f"logits differ by {diff:.2e} (> {atol}) for a prompt of {len(p)} tokens"

    single = [generate_greedy(engine, [p], max_new_tokens)[0] for p in prompts]
    batched = generate_greedy(engine, prompts, max_new_tokens, join_every=3)
    for i, want in enumerate(expected):
        assert single[i] == want, f"prompt {i}: greedy tokens differ alone\n ours {single[i]}\n hf   {want}"
        assert batched[i] == want, f"prompt {i}: greedy tokens differ in the batch\n ours {batched[i]}\n hf   {want}"
    return ParityReport(worst, single, batched, expected, engine.scheduler.num_preemptions,
                        engine.blocks.hits)
