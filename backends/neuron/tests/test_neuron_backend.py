"""The neuron backend plugin, tested on a CPU without the Neuron SDK.

What runs for real here: registration through the ``genserve`` entry point, the availability
check and the error ``--backend neuron`` gives, imports without the vendor libraries, the
bucketing and padding of batches to compiled shapes, and the runner end to end on a tiny
Llama. torch_xla's device is replaced by the CPU and ``xm.mark_step`` by a counter; results
are compared with the core's reference attention or the plain CPU runner. Compilation and
speed on a NeuronCore are untested.

Needs ``pip install -e backends/neuron --no-deps``.
"""

from __future__ import annotations

import dataclasses
import os
from importlib.metadata import entry_points

import pytest
import torch

from genserve.attention.testing import FEATURES, attention_spec, paged_batch, reference_attention
from genserve.attention.torch_ref import TorchReferenceAttention
from genserve.backends.select import BackendError, select_backend
from genserve.engine.sampling_params import SamplingParams
from genserve.plugins import load_plugins
from genserve.testing import generate_greedy, make_prompts

pytest.importorskip("genserve_neuron", reason="pip install -e backends/neuron --no-deps")

from genserve_neuron.attention import StaticPagedAttention  # noqa: E402
from genserve_neuron.backend import NeuronBackend  # noqa: E402
from genserve_neuron.options import NeuronOptions  # noqa: E402
from genserve_neuron.buckets import Bucket, Buckets, make_buckets  # noqa: E402
from genserve_neuron.padding import SeqChunk, pad_batch  # noqa: E402
from genserve_neuron.xla import XlaApi  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Registration, availability, selection, imports
# ---------------------------------------------------------------------------------------------

def test_entry_point_registers_backend_and_attention():
    eps = {ep.name: ep.value for ep in entry_points(group="genserve")}
    assert eps.get("neuron") == "genserve_neuron.plugin", \
        "neuron entry point missing: pip install -e backends/neuron"
    plugins = load_plugins()
    assert plugins.backends.get("neuron") is NeuronBackend
    assert plugins.backends.owner("neuron") == "neuron"  # registered by the entry point, not the core
    assert plugins.attention.get("neuron_static") is StaticPagedAttention
    assert not [p for p in plugins.failed() if p.name == "neuron"]


def test_reports_unavailable_without_vendor_libraries():
    assert NeuronBackend.is_available() is False
    assert "pip install torch-neuronx" in NeuronBackend.unavailable_reason()


def test_explicit_backend_gives_clear_error():
    with pytest.raises(BackendError) as err:
        select_backend(load_plugins(), "neuron")
    msg = str(err.value)
    assert "torch-neuronx" in msg and "install" in msg
    assert {"cpu", "neuron"} <= set(msg.split("installed backends: ")[1].split(", "))
    assert select_backend(load_plugins(), "auto").name == "cpu"


def test_plugin_imports_without_touching_vendor_libraries(load_without_vendor_libraries):
    out = load_without_vendor_libraries("neuron")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_vendor_loader_names_the_install_command():
    with pytest.raises(ImportError, match="pip install torch-neuronx neuronx-cc"):
        XlaApi()


# ---------------------------------------------------------------------------------------------
# Buckets and padding
# ---------------------------------------------------------------------------------------------

def test_buckets_pick_smallest_fit_and_cover_engine_limits():
    b = Buckets(decode_batch=(1, 2, 4), prefill_batch=(1, 2), prefill_len=(8, 32),
                context_blocks=(8, 32), block_size=4)
    assert b.pick(3, 1, 5) == Bucket(4, 1, 8)
    assert b.pick(2, 9, 9) == Bucket(2, 32, 32)
    with pytest.raises(ValueError, match="batch"):
        b.pick(5, 1, 1)
    with pytest.raises(ValueError, match="prefill length"):
        b.pick(1, 33, 9)
    # Every bucket a step can pick is compiled; a 32-token chunk needs >= 8 blocks of context.
    assert Bucket(1, 32, 8) in b.all() and len(b.all()) == 3 * 2 + 2 * 2 * 2

    from genserve.engine.config import EngineConfig
    from genserve.engine.scheduler import SchedulerConfig
    ec = EngineConfig(block_size=16, max_total_tokens=3000,
                      scheduler=SchedulerConfig(max_batch_prefill_tokens=700, max_batch_size=16))
    auto = make_buckets(NeuronOptions(), ec)
    assert auto.decode_batch == (1, 2, 4, 8, 16)
    assert auto.prefill_len[-1] >= 700 and auto.context_blocks[-1] * 16 >= 3000
    assert make_buckets(NeuronOptions(graph_sizes="1,8"), ec).decode_batch == (1, 8)


def test_neuron_core_for_rank():
    from genserve_neuron.backend import core_for_rank

    assert core_for_rank(None, 3) == 3
    assert core_for_rank("4-7", 1) == 5
    assert core_for_rank("0,2,8-9", 3) == 9
    with pytest.raises(ValueError, match="no NeuronCore"):
        core_for_rank("0-1", 2)


def test_pad_batch_right_aligns_and_pads_to_scratch():
    bs, pad = 4, 99
    chunks = [SeqChunk([11, 12, 13], start=5, block_table=[7, 3, 9]),  # positions 5..7
              SeqChunk([21], start=0, block_table=[4])]
    p = pad_batch(chunks, Bucket(batch=3, q_len=4, blocks=3), bs, pad)
    assert p.input_ids.tolist() == [0, 11, 12, 13, 0, 0, 0, 21, 0, 0, 0, 0]
    assert p.positions.tolist() == [0, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0, 0]
    s = pad * bs
    assert p.attn.slot_mapping.tolist() == [s, 3 * bs + 1, 3 * bs + 2, 3 * bs + 3, s, s, s, 4 * bs, s, s, s, s]
    assert p.attn.seq_lens.tolist() == [8, 1, 1]
    assert p.attn.block_tables.tolist() == [[7, 3, pad], [4, pad, pad], [pad, pad, pad]]
    assert p.attn.cu_seqlens_q.tolist() == [0, 4, 8, 12]
    assert (p.attn.max_seqlen_q, p.attn.max_seqlen_k) == (4, 12)
    assert p.real_rows(0, 3) == slice(1, 4) and p.real_rows(1, 1) == slice(7, 8)


def padded_version(seqs, tables, q, k, v, ctx, bucket, bs=4):
    """The same batch, padded to ``bucket`` with a scratch block appended to the cache."""
    chunks, at = [], 0
    for (s, ql), t in zip(seqs, tables):
        chunks.append(SeqChunk(list(range(ql)), s - ql, t))
        at += ql
    pad_block = ctx.shape[1]
    p = pad_batch(chunks, bucket, bs, pad_block)
    cache = torch.cat([ctx, torch.zeros_like(ctx[:, :1])], dim=1)
    Q = bucket.q_len
    rows = torch.cat([torch.arange(i * Q + Q - ql, (i + 1) * Q) for i, (_, ql) in enumerate(seqs)])

    def spread(x):
        out = x.new_zeros(bucket.batch * Q, *x.shape[1:])
        out[rows] = x
        return out

    return p, cache, rows, spread(q), spread(k), spread(v)


@pytest.mark.parametrize("impl", ["reference", "neuron_static"])
@pytest.mark.parametrize("features", list(FEATURES), ids=list(FEATURES))
def test_padded_batch_gives_the_unpadded_result(impl, features):
    """Padding keeps the attention contract: real rows and real cache blocks come out as
    without padding, through the reference attention and through neuron_static."""
    f = dict(FEATURES[features])
    Hkv = f.pop("Hkv", 2)
    spec = attention_spec(Hkv=Hkv, **f)
    seqs = [(9, 6), (20, 5), (13, 1)]
    q, k, v, ctx, tables, meta = paged_batch(seqs, Hkv=Hkv)
    want, want_cache = reference_attention(spec, q, k, v, ctx, meta)
    p, cache, rows, qp, kp, vp = padded_version(seqs, tables, q, k, v, ctx, Bucket(4, 8, 6))
    cls = TorchReferenceAttention if impl == "reference" else StaticPagedAttention
    out = cls(spec).forward(qp, kp, vp, cache, p.attn)
    torch.testing.assert_close(out[rows], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[:, :-1], want_cache)  # pad rows wrote only to scratch
    assert torch.isfinite(out).all()  # pad rows too: no NaN leaks into a compiled graph


# ---------------------------------------------------------------------------------------------
# The runner end to end on CPU, against the plain CPU runner
# ---------------------------------------------------------------------------------------------

class FakeXla:
    """torch_xla stand-in: the CPU is the device; mark_step only counts."""

    def __init__(self):
        self.mark_steps = 0

    def device(self):
        return torch.device("cpu")

    def mark_step(self):
        self.mark_steps += 1

    def wait_device_ops(self):
        pass

    def memory_info(self, device):
        return None

    def register_collectives(self):
        pass


class NeuronOnCpu(NeuronBackend):
    name = "neuron-on-cpu"
    BUCKETS = {"decode_batch": [1, 2, 4], "prefill_batch": [1, 2],
               "prefill_len": [8, 32], "context_len": [32, 64, 128]}

    @classmethod
    def is_available(cls):
        return True

    def __init__(self, options=None):
        super().__init__(dataclasses.replace(options or NeuronOptions(), **self.BUCKETS))
        self._api = FakeXla()


@pytest.fixture(scope="module")
def plugins():
    p = load_plugins()
    p.backends.register(NeuronOnCpu.name, NeuronOnCpu, owner="test")
    return p


def test_neuron_runner_end_to_end(build, cpu_tokens):
    """Mixed prefill/decode batches, chunked prefill and prefix-cache hits, every forward at a
    bucket's shape, the same greedy tokens as the CPU runner."""
    loaded = build("neuron-on-cpu")
    runner = loaded.engine.runner
    assert loaded.attention == "neuron_static" and type(runner).__name__ == "NeuronModelRunner"
    # Warmup compiled every bucket and wrote only to the scratch block.
    assert runner.buckets_run == set(runner.buckets.all())
    assert all(c[:, :-1].eq(0).all() for c in runner.kv_caches)

    shapes = []
    model_forward = runner.model.forward

    def record(input_ids, positions, batch):
        shapes.append((input_ids.shape[0], tuple(batch.attn.block_tables.shape)))
        return model_forward(input_ids, positions, batch)

    runner.model.forward = record
    tokens = generate_greedy(loaded.engine, make_prompts(256), 12, join_every=3)
    assert tokens == cpu_tokens
    allowed = {(b.batch * b.q_len, (b.batch, b.blocks)) for b in runner.buckets.all()}
    assert shapes and set(shapes) <= allowed
    assert any(s[0] > s[1][0] for s in shapes)  # prefill buckets ran, not only decode
    assert runner.backend.api.mark_steps >= len(shapes)


def test_sampling_and_prompt_logprobs_match_cpu(build, requests_outputs):
    """Seeded sampling, top-n tokens and prompt logprobs (chunked: 32-token prefill chunks)
    through the padded runner equal the CPU runner's."""
    params = SamplingParams(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, seed=7,
                            prompt_logprobs=True, top_n_tokens=3, ignore_eos=True)
    prompts = make_prompts(256)
    assert max(map(len, prompts)) > 32  # some prompt logprobs span two prefill chunks
    want = requests_outputs(build("cpu").engine, prompts, params)
    got = requests_outputs(build("neuron-on-cpu").engine, prompts, params)
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
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "4-7")
    NeuronOnCpu().set_device(1)
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "5"
