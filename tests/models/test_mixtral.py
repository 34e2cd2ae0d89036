"""Mixtral and its MoE layer: parity with transformers, dispatch paths, tensor-parallel sharding."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import MixtralConfig

from genserve.layers import moe
from genserve.layers.custom_op import LayerOps, use_layer_ops
from genserve.layers.moe import FusedMoE
from genserve.testing import assert_matches_transformers

E, TOP_K, H, I = 8, 2, 32, 48


def tiny_mixtral(**overrides):
    cfg = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False, num_local_experts=4,
               num_experts_per_tok=2)
    cfg.update(overrides)
    return MixtralConfig(**cfg)


@pytest.mark.parametrize("overrides", [
    {},
    {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": 8},
], ids=["4-experts", "8-experts-sliding"])
def test_mixtral_matches_transformers(tmp_path, overrides):
    report = assert_matches_transformers(tiny_mixtral(**overrides), tmp_path)
    assert report.max_logit_diff < 1e-3


def expert_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w1, w3 = torch.randn(E, I, H, generator=g) * 0.2, torch.randn(E, I, H, generator=g) * 0.2
    w2 = torch.randn(E, H, I, generator=g) * 0.2
    gate = torch.randn(E, H, generator=g)
    return gate, w1, w2, w3


class DenseExpertsOps(LayerOps):
    """A backend table whose ``fused_experts`` is the sync-free dense path (what the reference
    runs inside a CUDA graph): the seam a backend's fused MoE kernel plugs into."""

    name = "dense-experts"
    factories = {"fused_experts": lambda ops, layer: (
        lambda op, x, w13, w2, weights, ids, act: moe.dense_experts(x, w13, w2, weights, ids, act))}


def build_moe(shard="intermediate", seed=0, ops=None):
    gate, w1, w2, w3 = expert_weights(seed)
    with use_layer_ops(ops):
        layer = FusedMoE(E, TOP_K, H, I, shard=shard)
    layer.gate.weight.weight_loader(layer.gate.weight, gate)
    for e in range(E):  # through the checkpoint mapping, as the model loader does
        for ckpt, (target, shard_id) in FusedMoE.checkpoint_mapping(E):
            if ckpt.startswith(f".experts.{e}."):
                param = getattr(layer, target.lstrip("."))
                tensor = {"w1": w1, "w2": w2, "w3": w3}[shard_id[1]][e]
                param.weight_loader(param, tensor, shard_id)
    return layer


def naive_moe(x, seed=0):
    """Token by token, expert by expert: the definition."""
    gate, w1, w2, w3 = expert_weights(seed)
    probs = torch.softmax(x @ gate.T, dim=-1)
    weights, ids = probs.topk(TOP_K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], ids[t]):
            out[t] += w * ((torch.nn.functional.silu(x[t] @ w1[e].T) * (x[t] @ w3[e].T)) @ w2[e].T)
    return out


@pytest.mark.parametrize("path", ["grouped-mm", "per-expert-matmul", "dense"])
def test_moe_layer_matches_naive(monkeypatch, path):
    if path == "per-expert-matmul":  # where grouped_mm is missing
        monkeypatch.setattr(moe, "_GROUPED_MM_OK", {("cpu", torch.float32): False})
    if path == "dense":  # what CUDA graph capture runs
        monkeypatch.setattr(moe, "_capturing", lambda x: True)
    x = torch.randn(37, H, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(build_moe()(x), naive_moe(x), atol=1e-5, rtol=1e-5)
        # One token, as in a decode step of one sequence.
        torch.testing.assert_close(build_moe()(x[:1]), naive_moe(x[:1]), atol=1e-5, rtol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank, world, port):
    import torch.distributed as dist

    from genserve.distributed.state import set_tp_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        set_tp_group(rank, world)
        x = torch.randn(19, H, generator=torch.Generator().manual_seed(2))
        for shard, shape in (("intermediate", (E, 2 * I // world, H)), ("experts", (E // world, 2 * I, H))):
            layer = build_moe(shard)
            assert tuple(layer.w13_weight.shape) == shape
            dense = build_moe(shard, ops=DenseExpertsOps())  # the CUDA-graph path shards the same way
            assert dense.fused_experts.impl_name == "dense-experts"
            with torch.inference_mode():
                torch.testing.assert_close(layer(x), naive_moe(x), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(dense(x), naive_moe(x), atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_moe_tensor_parallel_matches_single_rank():
    """Two gloo ranks, intermediate- and expert-sharded, all-reduce to the unsharded output."""
    mp.spawn(_tp_worker, args=(2, _free_port()), nprocs=2, join=True)
