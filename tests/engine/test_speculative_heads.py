"""Proposers that draft from the target's hidden states (Medusa heads, EAGLE): outputs identical
with speculation on and off, proposals that are accepted when the heads know the answer, the
heads' computation against a pure-torch reading of the checkpoint format, bad checkpoints
refused."""

import shutil

import pytest
import torch

from genserve.engine.sampling_params import SamplingParams
from genserve.errors import ConfigError
from genserve.spec_decode.base import Proposer
from genserve.spec_decode.medusa import load_heads, medusa_config
from genserve.spec_decode.testing import random_medusa_heads, save_eagle, save_medusa_heads
from genserve.testing import load_genserve, make_prompts, reference_greedy, save_reference

from .test_speculative import assert_same, drive, with_proposer
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


# -- EAGLE -------------------------------------------------------------------------------
def eagle_engine(folder, draft, k=3, **flags):
    return load_genserve(folder, speculative_model=str(draft), speculative_method="eagle", speculate=k, **flags)


@pytest.mark.parametrize("own_embedding", [False, True])
@torch.inference_mode()
def test_eagle_draft_matches_transformers(target, tmp_path, own_embedding):
    """The draft through the paged cache (all rows at once, and a chunk then one row at a
    time) against transformers' LlamaModel on fc(concat(embed, hidden)), with EAGLE-1's
    first input norm and final norm left out."""
    from genserve.models.base import ForwardBatch
    from genserve.spec_decode.drafting import paged_inputs

    ref, fc = save_eagle(tmp_path / "eagle", tiny_llama_config(), seed=4, embed_tokens=own_embedding)
    engine = eagle_engine(target[0], tmp_path / "eagle")
    prop = engine.speculator.proposer
    ref.layers[0].input_layernorm, ref.norm = torch.nn.Identity(), torch.nn.Identity()
    embed = ref.embed_tokens if own_embedding else target[1].model.embed_tokens
    g = torch.Generator().manual_seed(5)
    T = 11
    tokens = torch.randint(0, VOCAB, (T,), generator=g)
    hidden = torch.randn(T, HIDDEN, generator=g)
    x = fc(torch.cat([embed(tokens), hidden], -1))
    want = ref(inputs_embeds=x[None], position_ids=torch.arange(T)[None]).last_hidden_state[0]

    bs = engine.runner.block_size
    def run(table, rows, h, first=0):
        ids, pos, meta, _ = paged_inputs([table], [rows], bs, torch.device("cpu"), [first])
        return prop.draft(ids, h, pos, ForwardBatch(meta, prop.kv_caches))

    torch.testing.assert_close(run([0, 1, 2], (tokens.tolist(), 0), hidden), want, rtol=1e-4, atol=1e-4)
    table = [5, 3, 4]
    got = [run(table, (tokens[:6].tolist(), 0), hidden[:6])]
    got += [run(table, ([int(tokens[p])], p), hidden[p:p + 1]) for p in range(6, T)]
    torch.testing.assert_close(torch.cat(got), want, rtol=1e-4, atol=1e-4)
    # Attention from a block boundary on (after a prefix-cache hit): the rows past it only.
    want_tail = ref(inputs_embeds=x[None, bs:], position_ids=torch.arange(bs, T)[None]).last_hidden_state[0]
    torch.testing.assert_close(run([9, 7, 8], (tokens[bs:].tolist(), bs), hidden[bs:], first=bs),
                               want_tail, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fc_bias,own_embedding", [(True, False), (False, True)])
def test_eagle_changes_no_output(target, tmp_path, fc_bias, own_embedding):
    save_eagle(tmp_path / "eagle", tiny_llama_config(), seed=6, fc_bias=fc_bias, embed_tokens=own_embedding)
    prompts = make_prompts(VOCAB, lengths=(5, 23, 9, 14))  # the last two share a cached prefix
    engine = eagle_engine(target[0], tmp_path / "eagle")
    on = drive(engine, mixed_requests(prompts), check_blocks=True)
    assert_same(on, drive(load_genserve(target[0]), mixed_requests(prompts)))
    assert [t.id for t in on["g0"].tokens] == reference_greedy(target[1], prompts[0], 16)
    assert engine.speculator.num_proposed > 0
    assert engine.blocks.num_used == 0 and not engine.speculator.proposer._state


def test_eagle_after_prefix_cache_hits(target, tmp_path):
    """A prefix-cache hit gives the target's K/V of the cached blocks but no hidden states for
    them: the draft attends from the first block it computed (whole-block hits), or from the
    next block boundary (a hit of the whole prompt, whose last token is computed again)."""
    save_eagle(tmp_path / "eagle", tiny_llama_config(), seed=9)
    p = make_prompts(VOCAB, lengths=(14,))[0]  # 26 tokens: 6 whole blocks of 4 cached
    params = SamplingParams(max_new_tokens=14, ignore_eos=True)
    requests = [(0, "a", p, params), (6, "b", p + [7, 8, 9], params), (7, "c", p, params)]
    engine = eagle_engine(target[0], tmp_path / "eagle", k=2)
    on = drive(engine, requests, check_blocks=True)
    assert engine.blocks.hits >= 48  # b and c: 24 tokens each, without hidden states
    assert_same(on, drive(load_genserve(target[0]), requests))
    assert engine.speculator.num_proposed >= 3 * 20  # b and c proposed too (a alone: 23)
    assert engine.blocks.num_used == 0


def test_eagle_with_chunking_and_preemption(target, tmp_path):
    save_eagle(tmp_path / "eagle", tiny_llama_config(), seed=7)
    prompts = make_prompts(VOCAB, lengths=(5, 23, 9, 40, 17, 31))
    small = dict(max_batch_prefill_tokens=8, max_batch_total_tokens=96, max_total_tokens=96,
                 max_input_tokens=80)
    requests = [(i, f"r{i}", p, SamplingParams(max_new_tokens=16, ignore_eos=True)) for i, p in enumerate(prompts)]
    engine = eagle_engine(target[0], tmp_path / "eagle", k=2, **small)
    on = drive(engine, requests, check_blocks=True)
    assert engine.scheduler.num_preemptions > 0
    assert_same(on, drive(load_genserve(target[0], **small), requests))
    assert engine.blocks.num_used == 0


@torch.inference_mode()
def fitted_eagle(folder, model, prompt, new_tokens):
    """An EAGLE draft whose layer is the identity (o_proj and down_proj zero) and whose fc maps
    the target's feature at t to its feature at t + 1 along ``model``'s greedy continuation of
    ``prompt`` (least squares: exact on fewer positions than dimensions): its proposals are
    the target's own next tokens. Returns that continuation."""
    from safetensors.torch import load_file, save_file

    ids = prompt + reference_greedy(model, prompt, new_tokens)
    feats = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    a = (torch.linalg.pinv(feats[:-2]) @ feats[1:-1]).T  # a @ f[t] = f[t + 1]
    save_eagle(folder, tiny_llama_config(), seed=8)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["fc.weight"] = torch.cat([torch.zeros(HIDDEN, HIDDEN), a], dim=1).contiguous()
    tensors["fc.bias"] = torch.zeros(HIDDEN)
    for name in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
        tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, str(folder / "model.safetensors"))
    return ids[len(prompt):]


def test_eagle_draft_that_extrapolates_features_gets_accepted(target, tmp_path):
    """Its proposals can only be accepted if the draft reads the right target feature for
    each position and feeds its own predictions forward."""
    prompt = make_prompts(VOCAB, lengths=(9,))[0]
    want = fitted_eagle(tmp_path / "eagle", target[1], prompt, 20)
    engine = eagle_engine(target[0], tmp_path / "eagle", k=3)
    out = drive(engine, [(0, "a", prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))], check_blocks=True)
    assert [t.id for t in out["a"].tokens] == want
    spec = engine.speculator
    # After the prefill's token, steps of 3 proposals + the bonus token: 3+3+3+3+2 proposals.
    assert spec.num_accepted == spec.num_proposed == 14


def test_eagle_keeps_up_while_speculation_is_off(target, tmp_path, caplog):
    """Above --speculative-max-batch-size no step proposes, but the draft still runs over every
    step's rows: after every step each decoding sequence's draft has computed every pair up to
    its last token (so proposals resume at once, and right, when speculation is back on)."""
    import logging

    from genserve.engine.offline import OfflineRequest, OutputCollector, iter_steps

    prompt, other = make_prompts(VOCAB, lengths=(9, 6))[:2]
    want = fitted_eagle(tmp_path / "eagle", target[1], prompt, 24)
    engine = eagle_engine(target[0], tmp_path / "eagle", k=3, speculative_max_batch_size=1)
    requests = [OfflineRequest(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True), request_id="a"),
                OfflineRequest(other, SamplingParams(max_new_tokens=8, ignore_eos=True), request_id="b")]
    collector = OutputCollector(requests)
    state = engine.speculator.proposer._state
    with caplog.at_level(logging.INFO, logger="genserve.spec_decode.speculator"):
        for outputs in iter_steps(engine, requests):
            collector.add(outputs)
            for seq in engine.scheduler.running:
                if seq.num_generated:
                    assert (state[seq.request_id].origin, state[seq.request_id].computed) == (0, len(seq) - 1)
    assert "speculation off: 2 sequences decoding" in caplog.text and "speculation back on" in caplog.text
    out = {r.request_id: r.outputs[0] for r in collector.results()}
    assert [t.id for t in out["a"].tokens] == want
    spec = engine.speculator
    assert spec.num_proposed >= 9 and spec.num_accepted == spec.num_proposed  # a's, after b finished


def test_bad_eagle_checkpoints_are_refused(target, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_llama_config()
    cfg.hidden_size = 128
    save_eagle(tmp_path / "wide", cfg)
    with pytest.raises(ConfigError, match="EAGLE draft .*: hidden size 128, the target's is 64"):
        eagle_engine(target[0], tmp_path / "wide")
    folder = tmp_path / "e"
    save_eagle(folder, tiny_llama_config())
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "down_proj" not in k}, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match="no weights for layers.0.mlp.down_proj.weight"):
        eagle_engine(target[0], folder)
    save_file({k: v for k, v in tensors.items() if not k.startswith("fc.")}, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match="no fc.weight"):
        eagle_engine(target[0], folder)
    save_file({**tensors, "fc.weight": torch.zeros(HIDDEN, HIDDEN)}, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"tensor fc.weight: .*\(64, 64\)"):
        eagle_engine(target[0], folder)
    save_file({"midlayer.self_attn.q_proj.weight": torch.zeros(4, 4), **tensors}, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match="EAGLE-3 checkpoint"):
        eagle_engine(target[0], folder)
    with pytest.raises(ConfigError, match="'eagle' needs --speculative-model"):
        load_genserve(target[0], speculate=2, speculative_method="eagle")
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    save_reference(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=4, n_positions=128), gpt2)
    save_eagle(folder, tiny_llama_config())
    with pytest.raises(ConfigError, match="GPT2.* is not of the Llama family"):
        eagle_engine(gpt2, folder)


# -- the hidden-state hook ---------------------------------------------------------------
class BrokenObserver(Proposer):
    """Drafts from hidden states and fails on them every other step."""

    name = "test-broken-observer"
    needs_hidden_states = True

    def __init__(self):
        self.calls = 0

    @classmethod
    def create(cls, ctx):
        return cls()

    def observe(self, rows):
        self.calls += 1
        assert all(r.hidden.shape[-1] == HIDDEN and r.start + len(r.hidden) <= len(r.seq) for r in rows)
        if self.calls % 2:
            raise RuntimeError("broken observer")

    def propose(self, requests):
        return [[1] * r.k for r in requests]


def test_hidden_states_cost_nothing_unasked_and_a_failing_observer_costs_no_request(target, caplog):
    assert load_genserve(target[0], speculate=2).runner.keep_hidden_states is False  # n-gram
    prompts = make_prompts(VOCAB, lengths=(5, 23, 9, 14))
    engine = with_proposer(load_genserve(target[0]), BrokenObserver(), k=2)
    engine.runner.keep_hidden_states = True  # what build_engine sets for needs_hidden_states
    on = drive(engine, mixed_requests(prompts), check_blocks=True)
    assert_same(on, drive(load_genserve(target[0]), mixed_requests(prompts)))
    assert engine.speculator.proposer.calls > 4
    assert "speculative proposer failed on the step's hidden states" in caplog.text
