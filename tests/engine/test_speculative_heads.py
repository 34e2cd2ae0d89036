"""Proposers that draft from the target's hidden states (Medusa heads, EAGLE): outputs identical
with speculation on and off, proposals that are accepted when the heads know the answer, the
heads' computation against a pure-torch reading of the checkpoint format, bad checkpoints
refused."""

import shutil

import pytest
import torch

from genserve.engine.sampling_params import SamplingParams
from genserve.errors import ConfigError
from genserve.spec_decode.medusa import load_heads, medusa_config
from genserve.spec_decode.testing import random_medusa_heads, save_medusa_heads
from genserve.testing import load_genserve, make_prompts, reference_greedy, save_reference

from .test_speculative import assert_same, drive
from .tinyllama import VOCAB, tiny_llama_config

HIDDEN = tiny_llama_config().hidden_size


def mixed_requests(prompts):
    return [(0, "g0", prompts[0], SamplingParams(max_new_tokens=16, ignore_eos=True)),
            (1, "s1", prompts[1], SamplingParams(max_new_tokens=16, do_sample=True, seed=4, ignore_eos=True)),
            (2, "g2", prompts[2], SamplingParams(max_new_tokens=12, ignore_eos=True, top_n_tokens=2)),
            (2, "p3", prompts[3], SamplingParams(max_new_tokens=10, repetition_penalty=1.3, do_sample=True,
                                                 seed=9, ignore_eos=True))]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny random Llama (folder, transformers model) with no heads: copied per test."""
    folder = tmp_path_factory.mktemp("tiny-target")
    return folder, save_reference(tiny_llama_config(), folder)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


# -- Medusa ------------------------------------------------------------------------------
def reference_heads(tensors, num_heads, num_layers, x, lm_head=None):
    """Medusa's head i as TGI's ``MedusaHead`` computes it, one head at a time:
    ``num_layers`` ResBlocks ``x + SiLU(x W^T + b)`` then the head's LM head (or the target's)."""
    out = []
    for i in range(num_heads):
        h = x
        for j in range(num_layers):
            w, b = tensors[f"{i}.{j}.linear.weight"], tensors[f"{i}.{j}.linear.bias"]
            h = h + torch.nn.functional.silu(h @ w.T + b)
        out.append(h @ tensors[f"{i}.{num_layers}.weight"].T if lm_head is None else lm_head(h))
    return torch.stack(out)


@pytest.mark.parametrize("num_layers,lm_heads", [(1, True), (2, True), (1, False)])
def test_medusa_heads_match_the_format(tmp_path, num_layers, lm_heads):
    tensors = random_medusa_heads(3, num_layers, HIDDEN, VOCAB, seed=1, lm_heads=lm_heads, scale=0.3)
    save_medusa_heads(tmp_path, tensors, 3, num_layers, base_model=tmp_path)
    target_head = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(2))
    lm_head = None if lm_heads else (lambda h: h @ target_head.T)
    heads = load_heads(tmp_path, medusa_config(tmp_path), HIDDEN, VOCAB, torch.float32,
                       torch.device("cpu"), lm_head=lm_head)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    want = reference_heads(tensors, 3, num_layers, x, lm_head)
    torch.testing.assert_close(heads(x), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(heads(x, 2), want[:2], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want[0], want[1])  # the heads differ: a mixed-up head would show


def test_medusa_random_heads_change_no_output(target, tmp_path):
    folder = copy_model(target[0], tmp_path / "m")
    save_medusa_heads(folder, random_medusa_heads(3, 1, HIDDEN, VOCAB), 3, 1)
    prompts = make_prompts(VOCAB, lengths=(5, 23, 9, 14))
    engine = load_genserve(folder)  # TGI: a checkpoint with heads speculates with them
    assert engine.speculator.config.method == "medusa" and engine.speculator.config.num_tokens == 3
    on = drive(engine, mixed_requests(prompts), check_blocks=True)
    off = drive(load_genserve(folder, speculate=0), mixed_requests(prompts))
    assert_same(on, off)
    assert [t.id for t in on["g0"].tokens] == reference_greedy(target[1], prompts[0], 16)
    assert engine.speculator.num_proposed > 0
    assert engine.blocks.num_used == 0


@torch.inference_mode()
def fitted_heads(model, prompt, new_tokens, num_heads):
    """Medusa heads that know ``model``'s greedy continuation of ``prompt``: identity ResBlocks
    (zero weights: x + SiLU(0) = x) and LM heads solved by least squares so that head i maps
    the final hidden state at position t to token t + 2 + i of that continuation (exact for
    fewer positions than hidden dimensions)."""
    ids = prompt + reference_greedy(model, prompt, new_tokens)
    out = model(torch.tensor([ids]), output_hidden_states=True)
    hidden = out.hidden_states[-1][0]  # [L, hidden], after the final norm: the LM head's input
    tensors = {}
    for i in range(num_heads):
        rows = range(len(prompt) - 1, len(ids) - 2 - i)
        targets = torch.zeros(len(rows), VOCAB)
        targets[torch.arange(len(rows)), [ids[t + 2 + i] for t in rows]] = 10.0
        tensors[f"{i}.0.linear.weight"] = torch.zeros(HIDDEN, HIDDEN)
        tensors[f"{i}.0.linear.bias"] = torch.zeros(HIDDEN)
        tensors[f"{i}.1.weight"] = (torch.linalg.pinv(hidden[list(rows)]) @ targets).T.contiguous()
    return tensors, ids[len(prompt):]


def test_medusa_heads_that_know_the_continuation_get_accepted(target, tmp_path):
    folder = copy_model(target[0], tmp_path / "m")
    prompt = make_prompts(VOCAB, lengths=(9,))[0]
    tensors, want = fitted_heads(target[1], prompt, 24, 3)
    save_medusa_heads(folder, tensors, 3, 1)
    engine = load_genserve(folder, speculate=3)
    out = drive(engine, [(0, "a", prompt, SamplingParams(max_new_tokens=24, ignore_eos=True))], check_blocks=True)
    assert [t.id for t in out["a"].tokens] == want
    spec = engine.speculator
    # Every proposal is right: after the prefill's token, each step emits its 3 proposals and
    # the bonus token (the last step fewer: max_new_tokens cuts the lookahead), so the 23
    # tokens after the first take 6 verify steps, with 17 proposals, instead of 23 decodes.
    assert spec.num_accepted == spec.num_proposed == 17
    assert engine.blocks.num_used == 0


def test_medusa_heads_only_folder_names_its_base_model(target, tmp_path):
    """TGI's layout: --model-id is a folder with the heads only; the base model comes from
    its ``base_model_name_or_path``."""
    heads = tmp_path / "heads"
    prompt = make_prompts(VOCAB, lengths=(9,))[0]
    tensors, want = fitted_heads(target[1], prompt, 12, 2)
    save_medusa_heads(heads, tensors, 2, 1, base_model=target[0])
    engine = load_genserve(heads)
    out = drive(engine, [(0, "a", prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))])
    assert [t.id for t in out["a"].tokens] == want
    assert engine.speculator.num_accepted == engine.speculator.num_proposed > 0


def test_bad_medusa_checkpoints_are_refused(target, tmp_path):
    folder = copy_model(target[0], tmp_path / "m")
    tensors = random_medusa_heads(2, 1, HIDDEN, VOCAB)
    save_medusa_heads(folder, tensors, 2, 1)
    (folder / "medusa_lm_head.safetensors").unlink()
    with pytest.raises(ConfigError, match="medusa_lm_head.safetensors does not exist"):
        load_genserve(folder)
    save_medusa_heads(folder, {k: v for k, v in tensors.items() if k != "1.0.linear.bias"}, 2, 1)
    with pytest.raises(ConfigError, match="no tensor '1.0.linear.bias'"):
        load_genserve(folder)
    save_medusa_heads(folder, random_medusa_heads(2, 1, HIDDEN * 2, VOCAB), 2, 1)
    with pytest.raises(ConfigError, match=r"0.0.linear.weight has shape \[128, 128\].*hidden size 64"):
        load_genserve(folder)
    save_medusa_heads(folder, {k: v for k, v in tensors.items() if k != "0.1.weight"}, 2, 1)
    with pytest.raises(ConfigError, match="LM heads for some heads only.*0.1.weight"):
        load_genserve(folder)
    save_medusa_heads(folder, tensors, 2, 1)
    with pytest.raises(ConfigError, match="--speculate 3: this Medusa checkpoint has only 2 heads"):
        load_genserve(folder, speculate=3)
    with pytest.raises(ConfigError, match="config.json has no medusa_num_heads"):
        load_genserve(target[0], speculate=2, speculative_method="medusa")
