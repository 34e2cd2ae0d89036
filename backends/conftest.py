"""Fixtures shared by the backend plugins' tests (``backends/<name>/tests``), run on a CPU.

Each test module defines a ``plugins`` fixture that adds its backend's ``...OnCpu`` variant
(the backend with its vendor calls replaced by documented pure-torch equivalents); the
fixtures here build engines on a tiny random Llama with those plugins and compare them with
the plain CPU runner.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import LlamaConfig

from genserve.args import defaults
from genserve.engine.build import build_engine
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.plugins import load_plugins
from genserve.testing import generate_greedy, make_prompts, save_reference

VENDOR_MODULES = ("intel_extension_for_pytorch", "oneccl_bindings_for_pytorch", "habana_frameworks",
                  "torch_neuronx", "torch_xla", "transformers_neuronx", "neuronx_distributed")

ENGINE = dict(dtype="float32", block_size=4, max_batch_total_tokens=1024, max_batch_prefill_tokens=32,
              max_total_tokens=128, max_input_tokens=100)


@pytest.fixture(scope="module")
def plugins():
    """The installed plugins; a test module overrides this to add its ``...OnCpu`` backend."""
    return load_plugins()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_reference(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               rms_norm_eps=1e-5, tie_word_embeddings=False), folder)
    return folder


@pytest.fixture(scope="module")
def build(checkpoint, plugins):
    """``build(backend, **flags)``: an engine for the tiny checkpoint on ``backend``."""
    def build_on(backend: str, **flags):
        return build_engine(defaults(model_id=str(checkpoint), backend=backend, **{**ENGINE, **flags}), plugins)
    return build_on


@pytest.fixture(scope="module")
def cpu_tokens(build):
    """Greedy tokens of the plain CPU runner, the reference for every backend's runner."""
    return generate_greedy(build("cpu").engine, make_prompts(256), 12, join_every=3)


def run_requests(engine, prompts, params):
    """Every output token (id, logprob, top-n) and the prompt logprobs of each request."""
    results = run_to_completion(engine, [OfflineRequest(p, params, request_id=f"r{i}")
                                         for i, p in enumerate(prompts)])
    return {r.request_id: {"ids": r.outputs[0].token_ids, "logprobs": r.outputs[0].logprobs,
                           "top": [[i for i, _ in top] for top in r.outputs[0].top_logprobs],
                           "prompt": r.prompt_logprobs} for r in results}


@pytest.fixture
def requests_outputs():
    """``requests_outputs(engine, prompts, params)``: see ``run_requests``."""
    return run_requests


@pytest.fixture
def load_without_vendor_libraries():
    """``load_without_vendor_libraries(name)``: in a fresh interpreter that refuses to import any
    vendor module (looking one up with importlib.util.find_spec is allowed), the plugins load
    and backend ``name`` registers, answers availability and builds. Returns the process."""
    def run(name: str) -> subprocess.CompletedProcess:
        code = f"""
import sys
class Refuse:
    # importlib.util.find_spec (a cheap "is it installed?") is allowed; an import is not.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in {VENDOR_MODULES!r}:
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "_find_and_load_unlocked":
                raise ImportError("vendor import attempted: " + name)
            frame = frame.f_back
        return None
sys.meta_path.insert(0, Refuse())
from genserve.plugins import load_plugins
plugins = load_plugins()
cls = plugins.backends.get({name!r})
assert cls.is_available() is False
cls.unavailable_reason()
cls(cls.options_cls())
assert not [p.error for p in plugins.failed()], plugins.failed()
print("ok")
"""
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return run
