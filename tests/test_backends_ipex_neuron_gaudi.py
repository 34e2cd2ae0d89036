"""The ipex, neuron and gaudi backend plugins, tested on a CPU with none of their libraries.

What runs for real here: registration through the ``genserve`` entry points, availability
checks and the errors ``--backend <name>`` gives, imports without the vendor libraries, the
KV-cache layout conversion for IPEX, Neuron's bucketing and padding, Gaudi's decode padding,
and all three runners end to end on a tiny Llama.

Where a vendor call sits in the path, it is replaced by a documented pure-torch equivalent,
and the result is compared with the core's reference attention or the plain CPU runner:

- ``ipex.llm.modules.PagedAttention`` (reshape_and_cache[_flash], flash_attn_varlen_func) by
  ``genserve_ipex.reference_ops.TorchPagedAttentionOps``, in the XPU (NHD) and CPU (HND) layout;
- Habana's ``FusedSDPA`` by ``torch.nn.functional.scaled_dot_product_attention`` (its documented
  equivalent), ``mark_step`` by a counter, ``wrap_in_hpu_graph`` by a wrapper that keys graphs
  on input shapes as Habana's does and calls the module;
- torch_xla's device by the CPU and ``xm.mark_step`` by a counter.

Nothing here runs IPEX, an Intel GPU, a Gaudi or a NeuronCore: kernel speed, compilation and
graph capture on those devices are untested.

Needs the three distributions installed:
``pip install -e backends/ipex -e backends/neuron -e backends/gaudi --no-deps``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from transformers import LlamaConfig

from genserve.args import defaults
from genserve.attention.base import AttentionMetadata, AttentionSpec, write_kv
from genserve.attention.torch_ref import TorchReferenceAttention
from genserve.backends.options import BackendOptions
from genserve.backends.select import BackendError, select_backend
from genserve.engine.build import build_engine
from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from genserve.engine.scheduler import ScheduledSeq
from genserve.engine.sequence import Sequence
from genserve.plugins import load_plugins
from genserve.testing import generate_greedy, make_prompts, save_reference

INSTALL = "pip install -e backends/ipex -e backends/neuron -e backends/gaudi --no-deps"
for _pkg in ("genserve_ipex", "genserve_neuron", "genserve_gaudi"):
    pytest.importorskip(_pkg, reason=f"{_pkg} is not installed: {INSTALL}")

from genserve_gaudi.attention import HpuPagedAttention, write_kv_index_put  # noqa: E402
from genserve_gaudi.backend import GaudiBackend  # noqa: E402
from genserve_gaudi.hpu import HpuApi  # noqa: E402
from genserve_gaudi.padding import padded_decode_batch, powers_of_two_upto  # noqa: E402
from genserve_ipex.attention import IpexPagedAttention, load_paged_attention_ops  # noqa: E402
from genserve_ipex.backend import IpexBackend, IpexOptions  # noqa: E402
from genserve_ipex.layout import HND, NHD, allocate_kv_cache, ipex_views  # noqa: E402
from genserve_ipex.reference_ops import TorchPagedAttentionOps  # noqa: E402
from genserve_neuron.attention import StaticPagedAttention  # noqa: E402
from genserve_neuron.backend import NeuronBackend  # noqa: E402
from genserve_neuron.buckets import Bucket, Buckets, make_buckets  # noqa: E402
from genserve_neuron.options import NeuronOptions  # noqa: E402
from genserve_neuron.padding import SeqChunk, pad_batch  # noqa: E402
from genserve_neuron.xla import XlaApi  # noqa: E402

VENDOR_MODULES = ("intel_extension_for_pytorch", "oneccl_bindings_for_pytorch", "habana_frameworks",
                  "torch_neuronx", "torch_xla", "transformers_neuronx", "neuronx_distributed")
OURS = {"ipex": IpexBackend, "neuron": NeuronBackend, "gaudi": GaudiBackend}


# ---------------------------------------------------------------------------------------------
# Registration, availability, selection, imports
# ---------------------------------------------------------------------------------------------

def test_entry_points_register_backends_and_attention():
    eps = {ep.name: ep.value for ep in entry_points(group="genserve")}
    for name in OURS:
        assert eps.get(name) == f"genserve_{name}.plugin", f"{name} entry point missing: {INSTALL}"
    plugins = load_plugins()
    for name, cls in OURS.items():
        assert plugins.backends.get(name) is cls
        assert plugins.backends.owner(name) == name  # registered by the entry point, not the core
    assert plugins.attention.get("ipex_paged") is IpexPagedAttention
    assert plugins.attention.get("neuron_static") is StaticPagedAttention
    assert plugins.attention.get("hpu_paged") is HpuPagedAttention
    assert not [p for p in plugins.failed() if p.name in OURS]


def test_backends_report_unavailable_without_vendor_libraries():
    for name, cls in OURS.items():
        assert cls.is_available() is False, name
    assert "intel_extension_for_pytorch" in IpexBackend.unavailable_reason()
    assert "pip install intel-extension-for-pytorch" in IpexBackend.unavailable_reason()
    assert "pip install torch-neuronx" in NeuronBackend.unavailable_reason()
    assert "habana_frameworks" in GaudiBackend.unavailable_reason()
    assert "habanalabs-installer.sh install --type pytorch" in GaudiBackend.unavailable_reason()


@pytest.mark.parametrize("name,library", [
    ("ipex", "intel_extension_for_pytorch"), ("neuron", "torch-neuronx"), ("gaudi", "habana_frameworks"),
])
def test_explicit_backend_gives_clear_error(name, library):
    plugins = load_plugins()
    with pytest.raises(BackendError) as err:
        select_backend(plugins, name)
    msg = str(err.value)
    assert library in msg and "install" in msg
    listed = msg.split("installed backends: ")[1].split(", ")
    assert {"cpu", "ipex", "neuron", "gaudi"} <= set(listed)


def test_auto_still_chooses_cpu_here():
    assert select_backend(load_plugins(), "auto").name == "cpu"


def test_plugins_import_without_touching_vendor_libraries():
    """In a fresh interpreter that refuses to import any vendor module (looking one up with
    importlib.util.find_spec is allowed), the plugins load, register, answer availability and
    build their backends."""
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
for name in ("ipex", "neuron", "gaudi"):
    cls = plugins.backends.get(name)
    assert cls.is_available() is False
    cls.unavailable_reason()
    cls(cls.options_cls())
assert not [p.error for p in plugins.failed()], plugins.failed()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_vendor_loaders_name_the_install_command():
    with pytest.raises(ImportError, match="pip install intel-extension-for-pytorch"):
        load_paged_attention_ops()
    with pytest.raises(ImportError, match="pip install torch-neuronx neuronx-cc"):
        XlaApi()
    with pytest.raises(ImportError, match="habanalabs-installer.sh"):
        HpuApi()


# ---------------------------------------------------------------------------------------------
# Random paged batches (pure torch)
# ---------------------------------------------------------------------------------------------

def paged_batch(seqs, H=4, Hkv=2, D=16, bs=4, extra_blocks=3, seed=0):
    """q/k/v for ``seqs`` = [(seq_len after this step, q_len)], a cache filled with random
    context everywhere (so a wrong slot cannot read a lucky zero), shuffled block tables."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-s // bs) for s, _ in seqs]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n])
        at += n
    T = sum(q for _, q in seqs)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv))
    cache = torch.randn(2, num_blocks, bs, Hkv, D, generator=g)
    slots, cu = [], [0]
    for (s, ql), t in zip(seqs, tables):
        slots += [t[p // bs] * bs + p % bs for p in range(s - ql, s)]
        cu.append(cu[-1] + ql)
    width = max(need)

    def meta():
        return AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            slot_mapping=torch.tensor(slots), max_seqlen_q=max(ql for _, ql in seqs),
            max_seqlen_k=max(s for s, _ in seqs), is_decode_only=all(ql == 1 for _, ql in seqs),
            seq_lens_cpu=[s for s, _ in seqs], query_lens_cpu=[ql for _, ql in seqs])

    return q, k, v, cache, tables, meta


SPECS = {
    "gqa": dict(),
    "mha": dict(Hkv=4),
    "window-alibi": dict(sliding_window=5, alibi_slopes=(0.5, 0.25, 0.125, 0.0625)),
    "softcap": dict(logit_softcap=2.0),
}


def make_spec(H=4, Hkv=2, D=16, **features):
    return AttentionSpec(H, D, Hkv, D ** -0.5, **features)


def reference(spec, q, k, v, cache, meta):
    cache = cache.clone()
    out = TorchReferenceAttention(spec).forward(q, k, v, cache, meta())
    return out, cache


MIXED = [(9, 9), (13, 1), (20, 5), (7, 1)]  # fresh prefill, decode, chunk over context, decode


# ---------------------------------------------------------------------------------------------
# IPEX: layouts and the paged kernel call
# ---------------------------------------------------------------------------------------------

def test_hnd_cache_is_a_view_of_head_major_storage():
    shape = (2, 5, 4, 3, 8)
    c = allocate_kv_cache(shape, HND, torch.float32, "cpu")
    assert c.shape == shape and not c.is_contiguous()
    key_cache, value_cache = ipex_views(c, HND)
    assert key_cache.shape == (5, 3, 4, 8) and key_cache.is_contiguous()
    c[0, 2, 1, 0] = 7.0  # block 2, offset 1, head 0 through our layout...
    assert key_cache[2, 0, 1].eq(7.0).all()  # ...is block 2, head 0, offset 1 in IPEX's
    value_cache[4, 2, 3] = -1.0
    assert c[1, 4, 3, 2].eq(-1.0).all()


def test_nhd_views_are_our_cache_without_copy():
    c = allocate_kv_cache((2, 5, 4, 3, 8), NHD, torch.float32, "cpu")
    key_cache, value_cache = ipex_views(c, NHD)
    assert key_cache.data_ptr() == c[0].data_ptr() and value_cache.data_ptr() == c[1].data_ptr()
    with pytest.raises(ValueError, match="not in IPEX's HND layout"):
        ipex_views(c, HND)  # a contiguous cache cannot be handed to the CPU kernels


# IPEX's CPU kernels (HND) take no window or softcap: test_ipex_supports_and_refuses_on_cpu.
IPEX_CASES = [(NHD, f) for f in SPECS] + [(HND, "gqa"), (HND, "mha")]


@pytest.mark.parametrize("layout,features", IPEX_CASES, ids=[f"{lay}-{f}" for lay, f in IPEX_CASES])
def test_ipex_paged_matches_reference(layout, features):
    f = dict(SPECS[features])
    Hkv = f.pop("Hkv", 2)
    spec = make_spec(Hkv=Hkv, **f)
    q, k, v, ctx, _, meta = paged_batch(MIXED, Hkv=Hkv)
    want, want_cache = reference(spec, q, k, v, ctx, meta)
    cache = allocate_kv_cache(ctx.shape, layout, ctx.dtype, "cpu")
    cache.copy_(ctx)
    ops = TorchPagedAttentionOps(layout)
    out = IpexPagedAttention(spec, ops=ops, layout=layout).forward(q, k, v, cache, meta())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache, want_cache)  # the writes landed in our layout's slots
    writer = "reshape_and_cache_flash" if layout == NHD else "reshape_and_cache"
    assert ops.calls == [writer, "flash_attn_varlen_func"]


def test_ipex_supports_and_refuses_on_cpu():
    spec, cpu, xpu = make_spec(), torch.device("cpu"), torch.device("xpu")
    assert IpexPagedAttention.supports(spec, torch.bfloat16, xpu) is None
    assert IpexPagedAttention.supports(spec, torch.float32, cpu) is None
    assert "float32" in IpexPagedAttention.supports(spec, torch.float32, xpu)
    assert IpexPagedAttention.supports(spec, torch.float16, cpu) is not None
    assert "cuda" in IpexPagedAttention.supports(spec, torch.bfloat16, torch.device("cuda"))
    assert "causal" in IpexPagedAttention.supports(make_spec(causal=False), torch.bfloat16, xpu)
    windowed = make_spec(sliding_window=4)
    assert "sliding window" in IpexPagedAttention.supports(windowed, torch.float32, cpu)
    q, k, v, ctx, _, meta = paged_batch([(5, 5)])
    cache = allocate_kv_cache(ctx.shape, HND, ctx.dtype, "cpu")
    with pytest.raises(NotImplementedError, match="--attention torch"):
        IpexPagedAttention(windowed, ops=TorchPagedAttentionOps(HND)).forward(q, k, v, cache, meta())


# ---------------------------------------------------------------------------------------------
# Neuron: buckets and padding
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
@pytest.mark.parametrize("features", list(SPECS), ids=list(SPECS))
def test_padded_batch_gives_the_unpadded_result(impl, features):
    """Padding keeps the attention contract: real rows and real cache blocks come out as
    without padding, through the reference attention and through neuron_static."""
    f = dict(SPECS[features])
    Hkv = f.pop("Hkv", 2)
    spec = make_spec(Hkv=Hkv, **f)
    seqs = [(9, 6), (20, 5), (13, 1)]
    q, k, v, ctx, tables, meta = paged_batch(seqs, Hkv=Hkv)
    want, want_cache = reference(spec, q, k, v, ctx, meta)
    p, cache, rows, qp, kp, vp = padded_version(seqs, tables, q, k, v, ctx, Bucket(4, 8, 6))
    cls = TorchReferenceAttention if impl == "reference" else StaticPagedAttention
    out = cls(spec).forward(qp, kp, vp, cache, p.attn)
    torch.testing.assert_close(out[rows], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache[:, :-1], want_cache)  # pad rows wrote only to scratch
    assert torch.isfinite(out).all()  # pad rows too: no NaN leaks into a compiled graph


# ---------------------------------------------------------------------------------------------
# Gaudi: decode padding, index_put writes, the static decode attention
# ---------------------------------------------------------------------------------------------

def test_index_put_write_equals_core_write():
    q, k, v, ctx, _, meta = paged_batch(MIXED)
    a, b = ctx.clone(), ctx.clone()
    write_kv(k, v, a, meta().slot_mapping)
    write_kv_index_put(k, v, b, meta().slot_mapping)
    assert torch.equal(a, b)


@pytest.mark.parametrize("features", list(SPECS), ids=list(SPECS))
def test_hpu_decode_path_matches_reference(features):
    f = dict(SPECS[features])
    Hkv = f.pop("Hkv", 2)
    spec = make_spec(Hkv=Hkv, **f)
    seqs = [(13, 1), (1, 1), (20, 1), (6, 1)]
    q, k, v, ctx, _, meta = paged_batch(seqs, Hkv=Hkv)
    want, want_cache = reference(spec, q, k, v, ctx, meta)
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
# The three runners end to end on CPU, against the plain CPU runner
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


class IpexOnCpu(IpexBackend):
    name = "ipex-on-cpu"

    @classmethod
    def is_available(cls):
        return True

    def __init__(self, options=None):
        super().__init__(dataclasses.replace(options or IpexOptions(), device="cpu"))


ENGINE = dict(dtype="float32", block_size=4, max_batch_total_tokens=1024, max_batch_prefill_tokens=32,
              max_total_tokens=128, max_input_tokens=100)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_reference(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               rms_norm_eps=1e-5, tie_word_embeddings=False), folder)
    return folder


@pytest.fixture(scope="module")
def plugins():
    p = load_plugins()
    for cls in (NeuronOnCpu, GaudiOnCpu, IpexOnCpu):
        p.backends.register(cls.name, cls, owner="test")
    return p


@pytest.fixture(scope="module")
def cpu_tokens(checkpoint, plugins):
    engine = build_engine(defaults(model_id=str(checkpoint), backend="cpu", **ENGINE), plugins).engine
    return generate_greedy(engine, make_prompts(256), 12, join_every=3)


def build(checkpoint, plugins, backend, **flags):
    return build_engine(defaults(model_id=str(checkpoint), backend=backend, **{**ENGINE, **flags}), plugins)


def test_neuron_runner_end_to_end(checkpoint, plugins, cpu_tokens):
    """Mixed prefill/decode batches, chunked prefill and prefix-cache hits, every forward at a
    bucket's shape, the same greedy tokens as the CPU runner."""
    loaded = build(checkpoint, plugins, "neuron-on-cpu")
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


def test_gaudi_runner_end_to_end(checkpoint, plugins, cpu_tokens):
    loaded = build(checkpoint, plugins, "gaudi-on-cpu")
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


def test_ipex_runner_end_to_end_with_cpu_layout(checkpoint, plugins, cpu_tokens, monkeypatch):
    ops = TorchPagedAttentionOps(HND)
    monkeypatch.setattr("genserve_ipex.attention.load_paged_attention_ops", lambda: ops)
    loaded = build(checkpoint, plugins, "ipex-on-cpu")
    runner = loaded.engine.runner
    assert loaded.attention == "ipex_paged" and runner.cache_layout == HND
    assert all(c.transpose(2, 3).is_contiguous() for c in runner.kv_caches)  # head-major storage
    assert generate_greedy(loaded.engine, make_prompts(256), 12, join_every=3) == cpu_tokens
    assert ops.calls.count("reshape_and_cache") == ops.calls.count("flash_attn_varlen_func") > 0


def test_ipex_runner_keeps_our_layout_for_torch_attention(checkpoint, plugins, cpu_tokens):
    loaded = build(checkpoint, plugins, "ipex-on-cpu", attention="torch")
    runner = loaded.engine.runner
    assert runner.cache_layout == NHD and all(c.is_contiguous() for c in runner.kv_caches)
    assert generate_greedy(loaded.engine, make_prompts(256), 12, join_every=3) == cpu_tokens


def run_requests(engine, prompts, params):
    """Every output token (id, logprob, top-n) and the prompt logprobs of each request."""
    results = run_to_completion(engine, [OfflineRequest(p, params, request_id=f"r{i}")
                                         for i, p in enumerate(prompts)])
    return {r.request_id: {"ids": r.outputs[0].token_ids, "logprobs": r.outputs[0].logprobs,
                           "top": [[i for i, _ in top] for top in r.outputs[0].top_logprobs],
                           "prompt": r.prompt_logprobs} for r in results}


@pytest.mark.parametrize("backend", ["neuron-on-cpu", "gaudi-on-cpu"])
def test_sampling_and_prompt_logprobs_match_cpu(checkpoint, plugins, backend):
    """Seeded sampling, top-n tokens and prompt logprobs (chunked: 32-token prefill chunks)
    through the padded runners equal the CPU runner's."""
    params = SamplingParams(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, seed=7,
                            prompt_logprobs=True, top_n_tokens=3, ignore_eos=True)
    prompts = make_prompts(256)
    assert max(map(len, prompts)) > 32  # some prompt logprobs span two prefill chunks
    want = run_requests(build(checkpoint, plugins, "cpu").engine, prompts, params)
    got = run_requests(build(checkpoint, plugins, backend).engine, prompts, params)
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
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "4-7")
    NeuronOnCpu().set_device(1)
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "5"
