"""Tiny random Llama + random PEFT adapters, and genserve/PEFT side-by-side helpers."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from genserve.engine.model_runner import ModelRunner
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.scheduler import ScheduledSeq
from genserve.engine.sequence import Sequence
from genserve.models.base import ForwardBatch
from genserve.testing import load_genserve, save_reference
from transformers import AutoModelForCausalLM, LlamaConfig

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(**overrides) -> LlamaConfig:
    cfg = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_base(folder: Path, config=None) -> Path:
    save_reference(config or tiny_llama(), folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int, **lora_config) -> Path:
    """A random PEFT LoRA adapter saved by PEFT itself; ``init_lora_weights=False`` makes B
    non-zero, so the adapter really changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "task_type": "CAUSAL_LM", **lora_config}
    get_peft_model(model, LoraConfig(**cfg)).save_pretrained(folder)
    return folder


def peft_model(base: Path, adapter: Path | None):
    """The reference: transformers' model with PEFT's adapter (or none)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def runner_fills_lora() -> bool:
    """Whether ModelRunner (the lead's part) already puts ``lora.batch_for`` in ForwardBatch."""
    return "batch_for" in inspect.getsource(ModelRunner)


def wire_lora(engine):
    """Until ModelRunner fills ``ForwardBatch.lora`` itself, do exactly what it will do
    (``batch.lora = runner.lora.batch_for(adapter ids, q_lens)``) around its own calls."""
    runner = engine.runner
    if runner_fills_lora() or getattr(runner, "_lora_wired", False):
        return engine
    prepare, execute = runner.prepare, runner.execute

    def wired_prepare(scheduled):
        runner._lora_scheduled = scheduled
        return prepare(scheduled)

    def wired_execute(input_ids, positions, batch):
        if batch.lora is None and runner.lora is not None:
            scheduled = runner._lora_scheduled
            batch.lora = runner.lora.batch_for([s.seq.params.adapter_id for s in scheduled],
                                               [s.num_tokens for s in scheduled])
        return execute(input_ids, positions, batch)

    runner.prepare, runner.execute, runner._lora_wired = wired_prepare, wired_execute, True
    return engine


def load_with_adapters(base: Path, spec: str | None, **flags):
    if spec is not None:
        flags["lora_adapters"] = spec
    return wire_lora(load_genserve(base, **flags))


@torch.inference_mode()
def batch_logits(engine, items: list[tuple[list[int], str | None]]) -> list[torch.Tensor]:
    """genserve's logits for every prompt position of several (prompt, adapter) requests run
    as ONE forward pass (one flat batch, rows of each request contiguous)."""
    seqs = [Sequence(f"probe-{i}", list(p), SamplingParams(max_new_tokens=1, adapter_id=a))
            for i, (p, a) in enumerate(items)]
    for s in seqs:
        engine.blocks.allocate(s)
        s.num_computed = 0
    try:
        runner = engine.runner
        scheduled = [ScheduledSeq(s, len(s.prompt_ids)) for s in seqs]
        prep = runner.prepare(scheduled)
        lora = runner.lora.batch_for([a for _, a in items], [len(p) for p, _ in items]) \
            if getattr(runner, "lora", None) is not None else None
        hidden = runner.forward(prep.input_ids, prep.positions,
                                ForwardBatch(prep.attn, runner.kv_caches, lora=lora))
        logits = runner.compute_logits(hidden).float()
        return list(logits.split([len(p) for p, _ in items]))
    finally:
        for s in seqs:
            engine.blocks.free_seq(s)


def generate(engine, items: list[tuple[list[int], str | None]], max_new_tokens: int,
             join_every: int = 0) -> list[list[int]]:
    """Greedy tokens through the real engine loop; request i joins after i * join_every steps,
    so prefills and decodes of different adapters share steps."""
    requests = [OfflineRequest(prompt, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True,
                                                      adapter_id=adapter), join_step=i * join_every)
                for i, (prompt, adapter) in enumerate(items)]
    return [r.outputs[0].token_ids for r in run_to_completion(engine, requests)]


@torch.inference_mode()
def reference_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0].float()
