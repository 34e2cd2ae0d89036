"""Speculative decoding on the CUDA backend (Triton kernels, decode CUDA graphs): outputs
identical with speculation on and off, for n-gram, a draft model, Medusa heads and EAGLE;
verify steps replay the decode graphs, and the hidden states Medusa/EAGLE read come from those
replays (fitted Medusa heads must be accepted). Run on a GPU: ``pytest -q tests/gpu/test_speculative_gpu.py``."""

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from genserve.engine.offline import OfflineRequest, run_to_completion  # noqa: E402
from genserve.engine.sampling_params import SamplingParams  # noqa: E402
from genserve.args import defaults  # noqa: E402
from genserve.engine.build import build_engine  # noqa: E402
from genserve.testing import make_prompts, save_reference  # noqa: E402
from genserve.spec_decode.testing import (  # noqa: E402
    random_medusa_heads, save_eagle, save_medusa_heads)
from tests.engine.test_speculative_heads import fitted_heads  # noqa: E402
from tests.engine.tinyllama import VOCAB, tiny_llama_config  # noqa: E402

FLAGS = dict(backend="cuda", dtype="float32", block_size=16, max_batch_total_tokens=8192)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    target = tmp_path_factory.mktemp("spec-target")
    save_reference(tiny_llama_config(), target)
    draft = tmp_path_factory.mktemp("spec-draft")
    cfg = tiny_llama_config()
    cfg.num_hidden_layers = 1
    save_reference(cfg, draft, seed=3)
    heads = tmp_path_factory.mktemp("spec-medusa")
    save_medusa_heads(heads, random_medusa_heads(3, 1, cfg.hidden_size, VOCAB), 3, 1, base_model=target)
    eagle = tmp_path_factory.mktemp("spec-eagle")
    save_eagle(eagle, tiny_llama_config(), seed=6)
    return target, draft, heads, eagle


def run(engine, prompts):
    params = [SamplingParams(max_new_tokens=24, ignore_eos=True),
              SamplingParams(max_new_tokens=24, ignore_eos=True, do_sample=True, seed=5, top_n_tokens=2)]
    requests = [OfflineRequest(p, params[i % 2]) for i, p in enumerate(prompts)]
    return [[t.id for t in r.outputs[0].tokens] for r in run_to_completion(engine, requests)]


def load_genserve(folder, **kw):
    return build_engine(defaults(model_id=str(folder), **kw)).engine


@pytest.mark.parametrize("method", ["ngram", "draft_model", "medusa", "eagle"])
def test_outputs_identical_on_cuda(folders, method):
    target, draft, heads, eagle = folders
    prompts = [p + p[:8] + p for p in make_prompts(VOCAB, lengths=(5, 23, 9, 40))]
    flags = FLAGS
    spec_flags = {"speculate": 3, **{
        "draft_model": {"speculative_model": str(draft)},
        "eagle": {"speculative_model": str(eagle), "speculative_method": "eagle"},
    }.get(method, {})}
    off = run(load_genserve(target, **flags), prompts)
    engine = load_genserve(heads if method == "medusa" else target, **flags, **spec_flags)
    assert engine.speculator.config.method == method
    graphs = engine.runner.graphs
    on = run(engine, prompts)
    assert on == off
    assert engine.speculator.num_proposed > 0 and engine.blocks.num_used == 0
    assert graphs is not None and graphs.graphs  # decode graphs were captured: verify rows replay them


def test_fitted_medusa_heads_are_accepted_under_cuda_graphs(folders, tmp_path):
    """The heads read the hidden state of the decode graph's replay: heads fitted to the
    target's greedy continuation (on transformers' CPU hidden states) are all accepted."""
    from transformers import AutoModelForCausalLM

    target = folders[0]
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    prompt = make_prompts(VOCAB, lengths=(9,))[0]
    tensors, want = fitted_heads(model, prompt, 24, 3)
    save_medusa_heads(tmp_path, tensors, 3, 1, base_model=target)
    engine = load_genserve(tmp_path, **FLAGS)
    requests = [OfflineRequest(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True))]
    assert [t.id for t in run_to_completion(engine, requests)[0].outputs[0].tokens] == want
    assert engine.runner.graphs is not None and engine.runner.graphs.graphs
    assert engine.speculator.num_accepted == engine.speculator.num_proposed == 17
