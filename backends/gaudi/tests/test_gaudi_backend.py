"""The gaudi backend plugin, tested on a CPU without the Gaudi software.

What runs for real here: registration through the ``genserve`` entry point, the availability
check and the error ``--backend gaudi`` gives, imports without the vendor libraries, the
decode padding, the index_put cache writes, the static decode attention, and the runner end to
end on a tiny Llama. Habana's ``FusedSDPA`` is replaced by
``torch.nn.functional.scaled_dot_product_attention`` (its documented equivalent),
``mark_step`` by a counter and ``wrap_in_hpu_graph`` by a wrapper that keys graphs on input
shapes as Habana's does and calls the module; results are compared with the core's reference
attention or the plain CPU runner. Graph capture and speed on a Gaudi are untested.

Needs ``pip install -e backends/gaudi --no-deps``.
"""

from __future__ import annotations

import dataclasses
import os
from importlib.metadata import entry_points

import pytest
import torch

from genserve.attention.base import write_kv
from genserve.attention.testing import FEATURES, MIXED, attention_spec, paged_batch, reference_attention
from genserve.backends.options import BackendOptions
from genserve.backends.select import BackendError, select_backend
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.scheduler import ScheduledSeq
from genserve.engine.sequence import Sequence
from genserve.plugins import load_plugins
from genserve.testing import generate_greedy, make_prompts

pytest.importorskip("genserve_gaudi", reason="pip install -e backends/gaudi --no-deps")

from genserve_gaudi.attention import HpuPagedAttention, write_kv_index_put  # noqa: E402
from genserve_gaudi.backend import GaudiBackend  # noqa: E402
from genserve_gaudi.hpu import HpuApi  # noqa: E402
from genserve_gaudi.padding import padded_decode_batch, powers_of_two_upto  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Registration, availability, selection, imports
# ---------------------------------------------------------------------------------------------

def test_entry_point_registers_backend_and_attention():
    eps = {ep.name: ep.value for ep in entry_points(group="genserve")}
    assert eps.get("gaudi") == "genserve_gaudi.plugin", "gaudi entry point missing: pip install -e backends/gaudi"
    plugins = load_plugins()
    assert plugins.backends.get("gaudi") is GaudiBackend
    assert plugins.backends.owner("gaudi") == "gaudi"  # registered by the entry point, not the core
    assert plugins.attention.get("hpu_paged") is HpuPagedAttention
    assert not [p for p in plugins.failed() if p.name == "gaudi"]


def test_reports_unavailable_without_vendor_libraries():
    assert GaudiBackend.is_available() is False
    assert "habana_frameworks" in GaudiBackend.unavailable_reason()
    assert "habanalabs-installer.sh install --type pytorch" in GaudiBackend.unavailable_reason()


def test_explicit_backend_gives_clear_error():
    with pytest.raises(BackendError) as err:
        select_backend(load_plugins(), "gaudi")
    msg = str(err.value)
    assert "habana_frameworks" in msg and "install" in msg
    assert {"cpu", "gaudi"} <= set(msg.split("installed backends: ")[1].split(", "))
    assert select_backend(load_plugins(), "auto").name == "cpu"


def test_plugin_imports_without_touching_vendor_libraries(load_without_vendor_libraries):
    out = load_without_vendor_libraries("gaudi")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_vendor_loader_names_the_install_command():
    with pytest.raises(ImportError, match="habanalabs-installer.sh"):
        HpuApi()


# ---------------------------------------------------------------------------------------------
# Decode padding, index_put writes, the static decode attention
# ---------------------------------------------------------------------------------------------

def test_index_put_write_equals_core_write():
    q, k, v, ctx, _, meta = paged_batch(MIXED)
    a, b = ctx.clone(), ctx.clone()
    write_kv(k, v, a, meta().slot_mapping)
    write_kv_index_put(k, v, b, meta().slot_mapping)
    assert torch.equal(a, b)


@pytest.mark.parametrize("features", list(FEATURES), ids=list(FEATURES))
def test_hpu_decode_path_matches_reference(features):
    f = dict(FEATURES[features])
    Hkv = f.pop("Hkv", 2)
    spec = attention_spec(Hkv=Hkv, **f)
    seqs = [(13, 1), (1, 1), (20, 1), (6, 1)]
    q, k, v, ctx, _, meta = paged_batch(seqs, Hkv=Hkv)
    want, want_cache = reference_attention(spec, q, k, v, ctx, meta)
    cache = ctx.clone()
    m = meta()
    assert m.is_decode_only
    out = HpuPagedAttention(spec).forward(q, k, v, cache, m)  # torch SDPA for FusedSDPA
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache, want_cache)


def _sequence(rid, prompt, computed, table, output=()):
    seq = Sequence(rid, list(prompt), SamplingParams(max_new_tokens=4))
    seq.output_ids = list(output)
    seq.num_computed, seq.block_table = computed, list(table)
    return seq


def test_padded_decode_batch_layout():
    bs, pad = 4, 50
    a = _sequence("a", range(1, 7), 6, [5, 8], output=[9])  # decodes token at position 6
    b = _sequence("b", range(1, 3), 2, [2], output=[7])  # position 2
    prep = padded_decode_batch([ScheduledSeq(a, 1), ScheduledSeq(b, 1)], batch=4, width=3,
                               block_size=bs, pad_block=pad, device="cpu")
    at = prep.attn
    assert prep.input_ids.tolist() == [9, 7, 0, 0] and prep.positions.tolist() == [6, 2, 0, 0]
    assert at.slot_mapping.tolist() == [8 * bs + 2, 2 * bs + 2, pad * bs, pad * bs]
    assert at.seq_lens.tolist() == [7, 3, 1, 1]
    assert at.block_tables.tolist() == [[5, 8, pad], [2, pad, pad], [pad] * 3, [pad] * 3]
    assert prep.logit_rows.tolist() == [0, 1] and prep.sampling_index == [0, 1]
    assert at.is_decode_only and at.max_seqlen_k == 3 * bs
    assert powers_of_two_upto(20) == (1, 2, 4, 8, 16, 20)


def test_gaudi_graph_sizes_follow_cuda_graphs_flag():
    assert GaudiBackend().graph_sizes(256) == (1, 2, 4, 8, 16, 32, 64)
    assert GaudiBackend(BackendOptions(graph_sizes="4,1")).graph_sizes(256) == (1, 4)
    assert GaudiBackend(BackendOptions(graph_sizes="0")).graph_sizes(256) == ()


# ---------------------------------------------------------------------------------------------
# The runner end to end on CPU, against the plain CPU runner
# ---------------------------------------------------------------------------------------------

def input_hash(obj):
    """How wrap_in_hpu_graph keys its graphs: tensors by (shape, dtype, device)."""
    if isinstance(obj, dict):
        return input_hash(tuple(obj.items()))
    if isinstance(obj, (list, tuple)):
        return hash(tuple(input_hash(e) for e in obj))
    if torch.is_tensor(obj):
        return hash((obj.shape, obj.dtype, obj.device))
    return hash(obj)


class FakeHpu:
    """habana_frameworks stand-in: lazy mode, counted mark_steps, shape-keyed "graphs"."""

    def __init__(self):
        self.mark_steps = 0
        self.graphs: dict[int, tuple] = {}

    def is_available(self):
        return True

    def is_lazy(self):
        return True

    def mark_step(self):
        self.mark_steps += 1

    def wrap_in_hpu_graph(self, module):
        forward = module.forward

        def replay(*args, **kwargs):
            for a in args:  # only tensors reach the graph: anything else would not hash
                assert torch.is_tensor(a)
            self.graphs.setdefault(input_hash((args, kwargs)), tuple(a.shape for a in args))
            return forward(*args, **kwargs)

        module.forward = replay
        return module

    def mem_get_info(self):
        return 1 << 30, 1 << 31

    def synchronize(self):
        pass

    def register_collectives(self):
        pass


class GaudiOnCpu(GaudiBackend):
    name = "gaudi-on-cpu"

    @classmethod
    def is_available(cls):
        return True

    def __init__(self, options=None):
        super().__init__(dataclasses.replace(options or BackendOptions(), graph_sizes="1,2,4"))
        self._api = FakeHpu()

    @property
    def device(self):
        return torch.device("cpu")


@pytest.fixture(scope="module")
def plugins():
    p = load_plugins()
    p.backends.register(GaudiOnCpu.name, GaudiOnCpu, owner="test")
    return p


def test_gaudi_runner_end_to_end(build, cpu_tokens):
    loaded = build("gaudi-on-cpu")
    runner = loaded.engine.runner
    api = runner.api
    assert loaded.attention == "hpu_paged" and runner.use_graphs
    widths = runner.width_buckets()
    captured = len(api.graphs)
    assert captured == len(runner.graph_batch_sizes) * len(widths)  # warmup: every (B, W)
    assert all(c[:, :-1].eq(0).all() for c in runner.kv_caches)
    tokens = generate_greedy(loaded.engine, make_prompts(256), 12, join_every=3)
    assert tokens == cpu_tokens
    assert len(api.graphs) == captured  # serving replayed warmed-up graphs only
    assert api.mark_steps > captured  # one per forward, graphed or not


def test_sampling_and_prompt_logprobs_match_cpu(build, requests_outputs):
    """Seeded sampling, top-n tokens and prompt logprobs (chunked: 32-token prefill chunks)
    through the padded runner equal the CPU runner's."""
    params = SamplingParams(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, seed=7,
                            prompt_logprobs=True, top_n_tokens=3, ignore_eos=True)
    prompts = make_prompts(256)
    assert max(map(len, prompts)) > 32  # some prompt logprobs span two prefill chunks
    want = requests_outputs(build("cpu").engine, prompts, params)
    got = requests_outputs(build("gaudi-on-cpu").engine, prompts, params)
    for rid, w in want.items():
        g = got[rid]
        assert g["ids"] == w["ids"] and g["top"] == w["top"], rid
        torch.testing.assert_close(torch.tensor(g["logprobs"]), torch.tensor(w["logprobs"]), atol=1e-4, rtol=0)
        assert g["prompt"][0] is None and len(g["prompt"]) == len(w["prompt"]) == len(prompts[int(rid[1:])])
        torch.testing.assert_close(torch.tensor(g["prompt"][1:]), torch.tensor(w["prompt"][1:]),
                                   atol=1e-4, rtol=0)


def test_set_device_pins_workers(monkeypatch):
    """What a tensor-parallel worker's set_device leaves behind (the collectives themselves
    are not run here)."""
    monkeypatch.setenv("LOCAL_RANK", "0")  # e.g. inherited from a torchrun parent
    GaudiOnCpu().set_device(3)
    assert os.environ["LOCAL_RANK"] == "3"


def test_lora_adapters_run_eagerly_and_match_cpu(build, checkpoint, tmp_path):
    """HPU graphs carry no per-row adapters: with LoRA the runner steps eagerly (it used to be
    told so by --cuda-graphs being cleared for every backend) and gives the CPU runner's tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["q_proj", "v_proj", "down_proj"])).save_pretrained(tmp_path / "a")
    spec = f"a={tmp_path / 'a'}"
    gaudi = build("gaudi-on-cpu", lora_adapters=spec)
    assert not gaudi.engine.runner.use_graphs
    prompts = make_prompts(256)
    cpu = build("cpu", lora_adapters=spec).engine
    items = [SamplingParams(max_new_tokens=8, adapter_id="a" if i % 2 else None) for i in range(len(prompts))]
    def tokens(engine):
        return [r.outputs[0].token_ids for r in run_to_completion(
            engine, [OfflineRequest(p, sp) for p, sp in zip(prompts, items)])]

    assert tokens(gaudi.engine) == tokens(cpu)
