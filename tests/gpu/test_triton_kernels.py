"""Triton paged-attention kernels against the pure-PyTorch reference.

Every case draws fresh random inputs (cache included, so wrong slots give wrong numbers)
and checks both the attention output and the KV cache after the write.
"""

import pytest
import torch

pytest.importorskip("triton")

from genserve.attention.base import AttentionSpec  # noqa: E402
from genserve.attention.torch_ref import TorchReferenceAttention  # noqa: E402
from genserve_cuda.attention.triton_paged import TritonPagedAttention  # noqa: E402
from genserve_cuda.testing import alibi_slopes, make_paged_batch  # noqa: E402

# Both sides round the output to the activation dtype, so allow ~one unit in the last place.
ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-4}
RTOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 1e-5}


def max_excess(out, ref, dtype) -> tuple[float, float]:
    """(max abs error, how far the worst element is past atol + rtol*|ref|; <= 0 passes)."""
    diff = (out.float() - ref.float()).abs()
    return diff.max().item(), (diff - ATOL[dtype] - RTOL[dtype] * ref.float().abs()).max().item()
_seed = iter(range(10_000))


def run_both(spec, batch, num_splits=None):
    """Reference and Triton outputs, plus both caches after the step."""
    ref_cache, tri_cache = batch.kv_cache.clone(), batch.kv_cache.clone()
    ref = TorchReferenceAttention(spec).forward(batch.q, batch.k, batch.v, ref_cache, batch.meta)
    if num_splits is not None:
        batch.meta.extra["decode_num_splits"] = num_splits
    out = TritonPagedAttention(spec).forward(batch.q, batch.k, batch.v, tri_cache, batch.meta)
    return ref, out, ref_cache, tri_cache


def check(spec, seqs, device, dtype=torch.bfloat16, block_size=16, num_splits=None):
    if device == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float16  # Triton's interpreter gets bf16 tl.dot wrong; GPUs run bf16
    gen = torch.Generator().manual_seed(next(_seed))
    batch = make_paged_batch(seqs, spec.num_heads, spec.num_kv_heads, spec.head_dim, block_size,
                             dtype, device, generator=gen)
    ref, out, ref_cache, tri_cache = run_both(spec, batch, num_splits)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    assert torch.equal(tri_cache, ref_cache), "KV write differs from index_copy_"
    err, excess = max_excess(out, ref, dtype)
    assert excess <= 0, f"max abs error {err:.3g} exceeds the {dtype} tolerance"
    return err


def spec_of(h, hkv, d, **kw):
    return AttentionSpec(num_heads=h, head_dim=d, num_kv_heads=hkv, scale=d ** -0.5, **kw)


HEADS = [(4, 4, 64), (8, 2, 64), (8, 1, 128), (6, 2, 80)]  # MHA, GQA, MQA, odd head_dim


# -- decode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("h,hkv,d", HEADS)
def test_decode_matches_reference(device, h, hkv, d):
    check(spec_of(h, hkv, d), [(1, 1), (17, 1), (40, 1), (100, 1)], device)


@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_decode_split_k_forced(device, num_splits):
    # More splits than some sequences have tiles: the empty splits must weigh nothing.
    check(spec_of(8, 2, 64), [(3, 1), (150, 1), (300, 1)], device, num_splits=num_splits)


def test_decode_long_context_split_k(device, on_gpu):
    if not on_gpu:
        pytest.skip("long contexts are too slow for the interpreter")
    check(spec_of(32, 8, 128), [(4000, 1), (8191, 1), (33, 1), (1500, 1)], device)
    check(spec_of(32, 8, 128), [(30000, 1)], device)  # one long sequence: split by occupancy


@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_decode_block_sizes(device, block_size):
    check(spec_of(8, 2, 64), [(5, 1), (70, 1)], device, block_size=block_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_dtypes(device, dtype):
    check(spec_of(8, 2, 64), [(9, 1), (80, 1)], device, dtype=dtype)


@pytest.mark.parametrize("kw", [dict(sliding_window=24), dict(logit_softcap=5.0),
                                dict(alibi_slopes=alibi_slopes(8)),
                                dict(sliding_window=40, logit_softcap=30.0, alibi_slopes=alibi_slopes(8))])
def test_decode_features(device, kw):
    check(spec_of(8, 2, 64, **kw), [(7, 1), (60, 1), (130, 1)], device, num_splits=2)
    check(spec_of(8, 2, 64, **kw), [(7, 1), (60, 1), (130, 1)], device, num_splits=1)


def test_decode_padding_rows_are_inert(device):
    """Graph padding: slot -1 writes nothing and seq_len 0 gives a zero row."""
    spec = spec_of(8, 2, 64)
    batch = make_paged_batch([(20, 1), (20, 1)], 8, 2, 64, dtype=torch.float16, device=device)
    batch.meta.slot_mapping[1] = -1
    batch.meta.seq_lens[1] = 0
    cache = batch.kv_cache.clone()
    for splits in (1, 4):
        batch.meta.extra["decode_num_splits"] = splits
        out = TritonPagedAttention(spec).forward(batch.q, batch.k, batch.v, cache, batch.meta)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
    changed = (cache != batch.kv_cache).flatten(2).any(-1)  # [2, num_blocks, block_size]
    assert changed.sum().item() == 2  # only sequence 0's new K and V slot


# -- prefill / mixed ------------------------------------------------------------------------
@pytest.mark.parametrize("h,hkv,d", HEADS)
def test_prefill_fresh(device, h, hkv, d):
    check(spec_of(h, hkv, d), [(1, 1), (37, 37), (70, 70)], device)


def test_prefill_prefix_cached(device):
    # Prefix-cache hits are whole blocks: the context before the query rows is block aligned.
    check(spec_of(8, 2, 64), [(48, 16), (80, 17), (33, 1)], device)


def test_chunked_prefill_and_mixed(device):
    # Chunks that start mid-block, next to decodes of other sequences.
    check(spec_of(8, 2, 64), [(50, 23), (1, 1), (90, 1), (129, 64), (5, 5)], device)


def test_prefill_long(device, on_gpu):
    if not on_gpu:
        pytest.skip("long contexts are too slow for the interpreter")
    check(spec_of(32, 8, 128), [(3000, 1000), (2048, 2048), (700, 1), (4100, 517)], device)


@pytest.mark.parametrize("kw", [dict(sliding_window=16), dict(sliding_window=33), dict(logit_softcap=8.0),
                                dict(alibi_slopes=alibi_slopes(8)), dict(causal=False),
                                dict(causal=False, sliding_window=20),
                                dict(sliding_window=30, logit_softcap=20.0, alibi_slopes=alibi_slopes(8))])
def test_prefill_features(device, kw):
    check(spec_of(8, 2, 64, **kw), [(70, 70), (90, 25), (12, 1)], device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_prefill_dtypes(device, dtype):
    check(spec_of(8, 2, 64), [(40, 40), (66, 20)], device, dtype=dtype)


def test_prefill_writes_every_output_row(device):
    """Poisoned output buffer: every row of every sequence must be overwritten."""
    from genserve_cuda.kernels.prefill_attention import paged_prefill_attention

    spec = spec_of(8, 2, 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    b = make_paged_batch([(70, 70), (33, 9), (8, 1)], 8, 2, 64, dtype=dtype, device=device)
    ref = TorchReferenceAttention(spec).forward(b.q, b.k, b.v, b.kv_cache, b.meta)
    out = torch.full_like(b.q, float("nan"))
    m = b.meta
    paged_prefill_attention(b.q, b.kv_cache, m.block_tables, m.seq_lens, m.cu_seqlens_q,
                            m.max_seqlen_q, spec.scale, out=out)
    assert not out.isnan().any()
    assert max_excess(out, ref, dtype)[1] <= 0


def test_fresh_prefill_reads_qkv_views(device):
    """The fresh-prompt path takes K/V straight from a fused QKV projection's strided views."""
    from genserve_cuda.kernels.prefill_attention import fresh_prefill_attention

    spec = spec_of(8, 2, 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    b = make_paged_batch([(70, 70), (9, 9), (1, 1)], 8, 2, 64, dtype=dtype, device=device)
    ref = TorchReferenceAttention(spec).forward(b.q, b.k, b.v, b.kv_cache, b.meta)
    T = b.q.shape[0]
    qkv = torch.cat([b.q.reshape(T, -1), b.k.reshape(T, -1), b.v.reshape(T, -1)], dim=1)
    q, k, v = qkv.split([8 * 64, 2 * 64, 2 * 64], dim=1)
    out = torch.full_like(b.q, float("nan"))
    m = b.meta
    fresh_prefill_attention(q.view(T, 8, 64), k.view(T, 2, 64), v.view(T, 2, 64), m.seq_lens,
                            m.cu_seqlens_q, m.max_seqlen_q, spec.scale, out=out)
    assert not out.isnan().any()
    assert max_excess(out, ref, dtype)[1] <= 0


def test_long_fresh_prompts_through_cudnn(device, on_gpu):
    """Long fresh prompts take cuDNN's attention on Hopper; the answer is the reference's."""
    if not on_gpu:
        pytest.skip("cuDNN attention needs a GPU")
    spec = spec_of(32, 8, 128)
    impl = TritonPagedAttention(spec)
    if not impl._cudnn.enabled:
        pytest.skip("cuDNN fused attention is used on Hopper and newer only")
    b = make_paged_batch([(2048, 2048), (3000, 3000)], 32, 8, 128, dtype=torch.bfloat16, device=device)
    assert impl._cudnn.wants(b.meta.query_lens_cpu, torch.bfloat16)
    ref = TorchReferenceAttention(spec).forward(b.q, b.k, b.v, b.kv_cache.clone(), b.meta)
    out = impl.forward(b.q, b.k, b.v, b.kv_cache, b.meta)
    assert impl._cudnn.enabled, "cuDNN refused the call and the Triton kernel served it"
    assert max_excess(out, ref, torch.bfloat16)[1] <= 0


@pytest.mark.parametrize("seqs", [[(48, 16), (80, 17), (33, 1)], [(70, 1), (33, 1), (129, 1)]])
def test_fp8_kv_cache(device, on_gpu, seqs):
    """--kv-cache-dtype fp8: the KV write rounds as torch's cast does (bit for bit), and
    attention over the fp8 cache matches the reference reading the same cache."""
    if not on_gpu:
        pytest.skip("Triton's interpreter emulates fp8 casts loosely (values off by a power of two)")
    spec = spec_of(8, 2, 64)
    b = make_paged_batch(seqs, 8, 2, 64, dtype=torch.bfloat16, device=device,
                         generator=torch.Generator().manual_seed(next(_seed)))
    b.kv_cache = b.kv_cache.to(torch.float8_e4m3fn)
    ref_cache, tri_cache = b.kv_cache.clone(), b.kv_cache.clone()
    ref = TorchReferenceAttention(spec).forward(b.q, b.k, b.v, ref_cache, b.meta)
    out = TritonPagedAttention(spec).forward(b.q, b.k, b.v, tri_cache, b.meta)
    assert torch.equal(tri_cache.view(torch.uint8), ref_cache.view(torch.uint8))
    assert max_excess(out, ref, torch.bfloat16)[1] <= 0
