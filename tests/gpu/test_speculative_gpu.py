"""Speculative decoding on the CUDA backend (Triton kernels, decode CUDA graphs): outputs
identical with speculation on and off, for n-gram and a draft model; verify steps replay the
decode graphs. Run on a GPU: ``pytest -q tests/gpu/test_speculative_gpu.py``."""

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
from tests.engine.tinyllama import VOCAB, tiny_llama_config  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    target = tmp_path_factory.mktemp("spec-target")
    save_reference(tiny_llama_config(), target)
    draft = tmp_path_factory.mktemp("spec-draft")
    cfg = tiny_llama_config()
    cfg.num_hidden_layers = 1
    save_reference(cfg, draft, seed=3)
    return target, draft


def run(engine, prompts):
    params = [SamplingParams(max_new_tokens=24, ignore_eos=True),
              SamplingParams(max_new_tokens=24, ignore_eos=True, do_sample=True, seed=5, top_n_tokens=2)]
    requests = [OfflineRequest(p, params[i % 2]) for i, p in enumerate(prompts)]
    return [[t.id for t in r.outputs[0].tokens] for r in run_to_completion(engine, requests)]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_outputs_identical_on_cuda(folders, method):
    target, draft = folders
    prompts = [p + p[:8] + p for p in make_prompts(VOCAB, lengths=(5, 23, 9, 40))]
    flags = dict(backend="cuda", dtype="float32", block_size=16, max_batch_total_tokens=8192)

    def load_genserve(folder, **kw):
        return build_engine(defaults(model_id=str(folder), **kw)).engine

    spec_flags = {"speculate": 3, **({"speculative_model": str(draft)} if method == "draft_model" else {})}
    off = run(load_genserve(target, **flags), prompts)
    engine = load_genserve(target, **flags, **spec_flags)
    graphs = engine.runner.graphs
    on = run(engine, prompts)
    assert on == off
    assert engine.speculator.num_proposed > 0 and engine.blocks.num_used == 0
    assert graphs is not None and graphs.graphs  # decode graphs were captured: verify rows replay them
