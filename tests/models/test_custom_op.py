"""Layers bind a backend's implementation when the model is built (``layers/custom_op.py``)."""

from typing import ClassVar

import torch
from genserve.attention.torch_ref import TorchAttention
from genserve.layers.activation import GatedActivation
from genserve.layers.custom_op import LayerOps, use_layer_ops
from genserve.layers.embedding import ParallelLMHead
from genserve.layers.norm import RMSNorm
from genserve.layers.rotary import RotaryEmbedding
from genserve.models.base import ModelContext, build_model
from genserve.models.llama import LlamaForCausalLM
from transformers import LlamaConfig


def _scaled_norm(layer, x, residual=None):
    """A stand-in "kernel": the reference result times two, so a call through it shows."""
    out = layer.forward_native(x, residual)
    return (2 * out[0], out[1]) if residual is not None else 2 * out


class Doubling(LayerOps):
    name = "doubling"
    factories: ClassVar = {"rms_norm": lambda ops, layer: _scaled_norm,
                           "gated_activation": lambda ops, layer: None}  # cannot serve: the reference


class OwnMaths(RMSNorm):
    def _norm(self, x):  # a subclass changing the reference maths keeps them
        return x


def test_layers_bind_at_construction_only():
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    with use_layer_ops(Doubling()):
        norm, act, own = RMSNorm(8), GatedActivation("silu"), OwnMaths(8)
    later = RMSNorm(8)  # built outside: the reference, whatever was current before
    assert (norm.impl_name, act.impl_name, own.impl_name, later.impl_name) == \
        ("doubling", "native", "native", "native")
    ref = later(x)
    assert torch.equal(norm(x), 2 * ref)
    out, res = norm(x, r)
    assert torch.equal(res, x + r) and torch.equal(out, 2 * later(x + r))
    assert torch.equal(own(x), x)
    assert torch.equal(act(torch.cat([x, r], -1)), torch.nn.functional.silu(x) * r)
    with use_layer_ops(Doubling()):
        pass
    assert torch.equal(norm(x), 2 * ref)  # nothing rebinds once built


def test_build_model_hands_the_context_layer_ops_to_every_layer():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ctx = ModelContext(dtype=torch.float32, device=torch.device("cpu"), attention_cls=TorchAttention,
                       layer_ops=Doubling())
    model = build_model(LlamaForCausalLM, cfg, ctx)
    bound = {type(m).__name__: m.impl_name for m in model.modules()
             if isinstance(m, (RMSNorm, GatedActivation, RotaryEmbedding, ParallelLMHead))}
    assert bound == {"RMSNorm": "doubling", "GatedActivation": "native",
                     "RotaryEmbedding": "native", "ParallelLMHead": "native"}
    plain = LlamaForCausalLM(cfg, ModelContext(dtype=torch.float32, device=torch.device("cpu"),
                                               attention_cls=TorchAttention))
    assert all(m.impl_name == "native" for m in plain.modules() if isinstance(m, RMSNorm))
