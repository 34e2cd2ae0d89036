"""Weight-only quantizers (--quantize fp8 / eetq): what they store, and how far their answers
move from the unquantized model's (they are approximations, so no token parity is claimed)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from genserve.layers.quantization.fp8 import FP8WeightOnly
from genserve.layers.quantization.int8 import Int8WeightOnly, quantize_int8_per_channel
from genserve.testing import generate_greedy, load_genserve, make_prompts, prompt_logits, save_reference


class Layer(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


def test_int8_per_channel_rounding():
    w = torch.randn(48, 80) * torch.linspace(0.01, 3, 48)[:, None]  # channels of very different size
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert q.abs().max() == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # round to nearest, per channel


@pytest.mark.parametrize("method", [Int8WeightOnly, FP8WeightOnly])
@pytest.mark.parametrize("rows", [1, 7])
def test_apply_matches_the_dequantized_weight(method, rows):
    torch.manual_seed(0)
    w, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(rows, 64)
    layer, quant = Layer(w.clone()), method()
    quant.process_after_loading(layer)
    assert not hasattr(layer, "weight") or not isinstance(layer.weight, torch.nn.Parameter)
    if method is Int8WeightOnly:
        deq = layer.weight_int8.float() * layer.weight_scale.float()[:, None]
        tol = 2e-2  # the CPU kernel takes bf16 activations
    else:
        deq = layer.weight_fp8.float() * layer.weight_scale.float()
        tol = 1e-5
    got = quant.apply(layer, x, bias)
    want = F.linear(x, deq, bias)
    assert got.dtype == x.dtype and got.shape == want.shape
    assert (got - want).abs().max() <= tol * want.abs().max()
    # The quantized weight is close to the original (int8: half a step per channel, plus the
    # bf16 rounding of the scale: 2**-9 of up to 127 steps).
    assert (deq - w).abs().max() <= (0.006 if method is Int8WeightOnly else 0.07) * w.abs().max()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-q")
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    save_reference(config, folder)
    return folder


@pytest.mark.parametrize("name,buffer", [("eetq", "weight_int8"), ("fp8", "weight_fp8")])
def test_quantized_model_stays_close(checkpoint, name, buffer):
    full, quant = load_genserve(checkpoint), load_genserve(checkpoint, quantize=name)
    layer = quant.runner.model.layers[0].mlp.down_proj
    assert hasattr(layer, buffer), "the linear layers hold quantized weights"
    for prompt in make_prompts(256, lengths=(6, 33)):
        a, b = prompt_logits(full, prompt), prompt_logits(quant, prompt)
        assert not torch.equal(a, b)
        assert F.cosine_similarity(a, b, dim=-1).min() > 0.99
    out = generate_greedy(quant, make_prompts(256, lengths=(9, 21)), 10)
    assert [len(o) for o in out] == [10, 10]
