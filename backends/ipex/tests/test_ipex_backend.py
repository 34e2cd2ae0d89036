"""The ipex backend plugin, tested on a CPU without IPEX or an Intel GPU.

(With IPEX installed, ``test_ipex_cpu.py`` runs its real kernels; the tests here then hide
IPEX from the interpreter, ``without_ipex``, so that they check the same code paths.)

What runs for real here: registration through the ``genserve`` entry point, the availability
check and the error ``--backend ipex`` gives, imports without the vendor libraries, the
KV-cache layout conversion, and the runner end to end on a tiny Llama. IPEX's
``ipex.llm.modules.PagedAttention`` (reshape_and_cache[_flash], flash_attn_varlen_func) is
replaced by ``genserve_ipex.reference_ops.TorchPagedAttentionOps``, in the XPU (NHD) and CPU
(HND) layout, and the results are compared with the core's reference attention or the plain
CPU runner. Kernel speed on Intel hardware is untested.

Needs ``pip install -e backends/ipex --no-deps``.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import dataclasses
import pytest
import torch

from genserve.attention.testing import FEATURES, MIXED, attention_spec, paged_batch, reference_attention
from genserve.backends.select import BackendError, select_backend
from genserve.plugins import load_plugins
from genserve.testing import generate_greedy, make_prompts

pytest.importorskip("genserve_ipex", reason="pip install -e backends/ipex --no-deps")

from genserve_ipex.attention import IpexPagedAttention, load_paged_attention_ops  # noqa: E402
from genserve_ipex.backend import IpexBackend, IpexOptions  # noqa: E402
from genserve_ipex.layout import HND, NHD, allocate_kv_cache, ipex_views  # noqa: E402
from genserve_ipex.reference_ops import TorchPagedAttentionOps  # noqa: E402
from genserve_ipex.vendor import ipex_installed  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Registration, availability, selection, imports
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def without_ipex(monkeypatch):
    """IPEX hidden from this interpreter (a None entry in sys.modules: find_spec answers None
    and an import raises ImportError), whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", None)


def test_entry_point_registers_backend_and_attention():
    eps = {ep.name: ep.value for ep in entry_points(group="genserve")}
    assert eps.get("ipex") == "genserve_ipex.plugin", "ipex entry point missing: pip install -e backends/ipex"
    plugins = load_plugins()
    assert plugins.backends.get("ipex") is IpexBackend
    assert plugins.backends.owner("ipex") == "ipex"  # registered by the entry point, not the core
    assert plugins.attention.get("ipex_paged") is IpexPagedAttention
    assert not [p for p in plugins.failed() if p.name == "ipex"]


def test_reports_unavailable_without_vendor_libraries(without_ipex):
    assert IpexBackend.is_available() is False
    assert "intel_extension_for_pytorch" in IpexBackend.unavailable_reason()
    assert "pip install intel-extension-for-pytorch" in IpexBackend.unavailable_reason()


def test_explicit_backend_gives_clear_error(without_ipex):
    with pytest.raises(BackendError) as err:
        select_backend(load_plugins(), "ipex")
    msg = str(err.value)
    assert "intel_extension_for_pytorch" in msg and "install" in msg
    assert {"cpu", "ipex"} <= set(msg.split("installed backends: ")[1].split(", "))
    assert select_backend(load_plugins(), "auto").name == "cpu"


@pytest.mark.skipif("intel_extension_for_pytorch" in sys.modules or ipex_installed(),
                    reason="IPEX is installed, so the backend is available: test_ipex_cpu.py checks "
                           "that loading the plugin does not import it")
def test_plugin_imports_without_touching_vendor_libraries(load_without_vendor_libraries):
    out = load_without_vendor_libraries("ipex")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_vendor_loader_names_the_install_command(without_ipex):
    with pytest.raises(ImportError, match="pip install intel-extension-for-pytorch"):
        load_paged_attention_ops()


# ---------------------------------------------------------------------------------------------
# Layouts and the paged kernel call
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


# IPEX's CPU kernels (HND) take no ALiBi: test_ipex_supports_and_refuses_on_cpu.
IPEX_CASES = [(NHD, f) for f in FEATURES] + [(HND, "gqa"), (HND, "mha"), (HND, "softcap")]


@pytest.mark.parametrize("layout,features", IPEX_CASES, ids=[f"{lay}-{f}" for lay, f in IPEX_CASES])
def test_ipex_paged_matches_reference(layout, features):
    f = dict(FEATURES[features])
    Hkv = f.pop("Hkv", 2)
    spec = attention_spec(Hkv=Hkv, **f)
    q, k, v, ctx, _, meta = paged_batch(MIXED, Hkv=Hkv)
    want, want_cache = reference_attention(spec, q, k, v, ctx, meta)
    cache = allocate_kv_cache(ctx.shape, layout, ctx.dtype, "cpu")
    cache.copy_(ctx)
    ops = TorchPagedAttentionOps(layout)
    out = IpexPagedAttention(spec, ops=ops, layout=layout).forward(q, k, v, cache, meta())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache, want_cache)  # the writes landed in our layout's slots
    writer = "reshape_and_cache_flash" if layout == NHD else "reshape_and_cache"
    assert ops.calls == [writer, "flash_attn_varlen_func"]


def test_ipex_supports_and_refuses_on_cpu():
    spec, cpu, xpu = attention_spec(), torch.device("cpu"), torch.device("xpu")
    assert IpexPagedAttention.supports(spec, torch.bfloat16, xpu) is None
    assert IpexPagedAttention.supports(spec, torch.float32, cpu) is None
    assert "float32" in IpexPagedAttention.supports(spec, torch.float32, xpu)
    assert IpexPagedAttention.supports(spec, torch.float16, cpu) is not None
    assert "cuda" in IpexPagedAttention.supports(spec, torch.bfloat16, torch.device("cuda"))
    assert "causal" in IpexPagedAttention.supports(attention_spec(causal=False), torch.bfloat16, xpu)
    # IPEX 2.8's CPU kernel takes a sliding window and softcap (test_ipex_cpu.py runs them)
    # but raises on ALiBi slopes, which are refused up front.
    assert IpexPagedAttention.supports(attention_spec(sliding_window=4), torch.float32, cpu) is None
    assert IpexPagedAttention.supports(attention_spec(logit_softcap=2.0), torch.float32, cpu) is None
    alibi = attention_spec(alibi_slopes=(0.5, 0.25, 0.125, 0.0625))
    assert "ALiBi" in IpexPagedAttention.supports(alibi, torch.float32, cpu)
    assert IpexPagedAttention.supports(alibi, torch.bfloat16, xpu) is None
    q, k, v, ctx, _, meta = paged_batch([(5, 5)])
    cache = allocate_kv_cache(ctx.shape, HND, ctx.dtype, "cpu")
    with pytest.raises(NotImplementedError, match="--attention torch"):
        IpexPagedAttention(alibi, ops=TorchPagedAttentionOps(HND)).forward(q, k, v, cache, meta())


# ---------------------------------------------------------------------------------------------
# The runner end to end on CPU, against the plain CPU runner
# ---------------------------------------------------------------------------------------------

class IpexOnCpu(IpexBackend):
    name = "ipex-on-cpu"

    @classmethod
    def is_available(cls):
        return True

    def __init__(self, options=None):
        super().__init__(dataclasses.replace(options or IpexOptions(), device="cpu"))


@pytest.fixture(scope="module")
def plugins():
    p = load_plugins()
    p.backends.register(IpexOnCpu.name, IpexOnCpu, owner="test")
    return p


def test_ipex_runner_end_to_end_with_cpu_layout(build, cpu_tokens, monkeypatch):
    ops = TorchPagedAttentionOps(HND)
    monkeypatch.setattr("genserve_ipex.attention.load_paged_attention_ops", lambda: ops)
    loaded = build("ipex-on-cpu")
    runner = loaded.engine.runner
    assert loaded.attention == "ipex_paged" and runner.cache_layout == HND
    assert all(c.transpose(2, 3).is_contiguous() for c in runner.kv_caches)  # head-major storage
    assert generate_greedy(loaded.engine, make_prompts(256), 12, join_every=3) == cpu_tokens
    assert ops.calls.count("reshape_and_cache") == ops.calls.count("flash_attn_varlen_func") > 0


def test_ipex_runner_keeps_our_layout_for_torch_attention(build, cpu_tokens):
    loaded = build("ipex-on-cpu", attention="torch")
    runner = loaded.engine.runner
    assert runner.cache_layout == NHD and all(c.is_contiguous() for c in runner.kv_caches)
    assert generate_greedy(loaded.engine, make_prompts(256), 12, join_every=3) == cpu_tokens
