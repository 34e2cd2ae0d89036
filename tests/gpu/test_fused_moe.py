"""The CUDA backend's fused MoE (``genserve_cuda.kernels.fused_moe``) against the reference
``genserve.layers.moe.fused_experts`` and the token-by-token definition.

On the GPU in bf16; on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``) in fp16 on
tiny shapes. Every check draws fresh routing, including pairs routed to another rank's expert.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from genserve.layers.activation import GatedActivation  # noqa: E402
from genserve.layers.moe import dense_experts, fused_experts  # noqa: E402
from genserve_cuda.kernels.fused_moe import fused_moe, moe_align  # noqa: E402


@pytest.fixture
def dtype(device):
    # Triton's CPU interpreter has no bfloat16 arithmetic; the GPU runs the serving dtype.
    return torch.bfloat16 if device == "cuda" else torch.float16


def routing(T, E, top_k, device, seed, remote=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    if remote:  # some pairs belong to another rank (expert sharding): id E, no contribution
        ids = torch.where(torch.rand(T, top_k, generator=g) < 0.3, torch.full_like(ids, E), ids)
    return weights.to(device), ids.to(device)


@pytest.mark.parametrize("T", [1, 5, 37, 300])
@pytest.mark.parametrize("E,top_k,H,I", [(4, 2, 64, 96), (8, 2, 128, 256)])
def test_fused_moe_matches_the_reference(device, dtype, T, E, top_k, H, I):
    if device == "cpu" and T == 300:
        pytest.skip("large case on the GPU only (the interpreter is slow)")
    torch.manual_seed(T + E)
    x = torch.randn(T, H, device=device, dtype=dtype)
    w13 = (torch.randn(E, 2 * I, H, device=device) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device) * I ** -0.5).to(dtype)
    for remote in (False, True):
        weights, ids = routing(T, E, top_k, device, T + E, remote)
        act = GatedActivation("silu")
        got = fused_moe(x, w13, w2, weights, ids, act)
        want = fused_experts(x.float(), w13.float(), w2.float(), weights, ids, act)
        assert got.shape == (T, H) and got.dtype == dtype
        err = ((got.float() - want).norm() / want.norm()).item()
        assert err < 1e-2, (remote, err)
        # and the dense path (what CUDA graphs ran before) agrees on the same routing
        dense = dense_experts(x.float(), w13.float(), w2.float(), weights, ids, act)
        torch.testing.assert_close(want, dense, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "one-launch"])
@pytest.mark.parametrize("block_m", [4, 16])
def test_alignment_puts_each_routed_pair_once_in_a_block_of_its_expert(device, block_m, kernel):
    E, T, top_k = 5, 23, 2
    _, ids = routing(T, E, top_k, device, 7, remote=True)
    a = moe_align(ids, E, block_m, kernel=kernel)
    pairs, experts, rows = a.sorted_pairs.cpu(), a.block_experts.cpu(), int(a.num_rows.item())
    flat = ids.reshape(-1).cpu()
    P = flat.numel()
    assert rows % block_m == 0 and rows <= pairs.numel()
    seen = pairs[:rows][pairs[:rows] < P]
    local = (flat < E).nonzero().squeeze(1)
    assert sorted(seen.tolist()) == sorted(local.tolist())          # every local pair exactly once
    assert bool((pairs[rows:] == P).all())                          # nothing past the used rows
    for b in range(rows // block_m):
        block = pairs[b * block_m:(b + 1) * block_m]
        block = block[block < P]
        assert bool((flat[block.long()] == experts[b]).all())       # one expert per block
    if kernel:  # the same layout as the torch path: run lengths, block experts, row count
        ref = moe_align(ids, E, block_m, kernel=False)
        assert int(ref.num_rows.item()) == rows
        assert torch.equal(ref.block_experts.cpu()[: rows // block_m], experts[: rows // block_m])
        assert torch.equal(ref.sorted_pairs.cpu(), pairs)  # both keep pair order inside a run


def test_capture_in_a_cuda_graph_reads_the_routing_of_each_replay(device):
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    E, top_k, H, I, T = 8, 2, 128, 256, 4
    torch.manual_seed(0)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, device=device) * H ** -0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device=device) * I ** -0.5).bfloat16()
    act = GatedActivation("silu")
    weights, ids = routing(T, E, top_k, device, 1)
    s_w, s_ids = weights.clone(), ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_moe(x, w13, w2, s_w, s_ids, act)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, s_w, s_ids, act)
    for seed in (2, 3):
        w_new, ids_new = routing(T, E, top_k, device, seed)
        s_w.copy_(w_new)
        s_ids.copy_(ids_new)
        graph.replay()
        want = fused_experts(x.float(), w13.float(), w2.float(), w_new, ids_new, act)
        assert ((out.float() - want).norm() / want.norm()).item() < 1e-2


def test_cuda_layer_ops_bind_the_fused_kernel_to_moe_layers(device, dtype):
    from genserve.layers.custom_op import use_layer_ops
    from genserve.layers.moe import FusedMoE
    from genserve_cuda.layer_ops import CudaLayerOps, fused_moe_experts

    with use_layer_ops(CudaLayerOps()):
        layer = FusedMoE(4, 2, 64, 96, dtype=dtype)
    assert layer.fused_experts.impl_name == "cuda" and layer.fused_experts._impl is fused_moe_experts
    layer = layer.to(device)
    for p in (layer.gate.weight, layer.w13_weight, layer.w2_weight):
        p.data.normal_(0, 0.1)
    x = torch.randn(9, 64, device=device, dtype=dtype)
    with torch.inference_mode():
        weights, ids = layer.route(x)
        want = fused_experts(x.float(), layer.w13_weight.float(), layer.w2_weight.float(), weights, ids, layer.act)
        got = layer(x)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
    assert F.cosine_similarity(got.float(), want, dim=-1).min() > 0.99
