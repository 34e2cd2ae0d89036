"""genserve.LLM (offline generation, vLLM's shape) and the step loop under it, against
transformers on tiny random Llamas: greedy tokens, prompt logprobs, input order, token-id
prompts, per-prompt sampling parameters, and clear errors for bad keywords and inputs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import genserve
from genserve.args import FLAGS, defaults
from genserve.engine.offline import OfflineRequest, OutputCollector, iter_steps, run_to_completion
from genserve.engine.sampling_params import SamplingParams
from genserve.entrypoints.llm import LLM, NOT_OFFLINE_FLAGS, engine_args
from genserve.testing import make_prompts, reference_greedy, save_reference
from tests.server.tinymodel import build_tiny_llama

CPU = dict(backend="cpu", dtype="float32", block_size=4, max_batch_total_tokens=4096,
           max_batch_prefill_tokens=64)
TEXTS = ["Paris", "The quick brown fox jumps over the lazy dog. Pack my box with five",
         "A language model predicts", "Servers batch many requests together so the accelerator"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama with a real tokenizer (it never emits EOS), and its transformers twin."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-chat"))
    return LLM(folder, **CPU), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids_model(tmp_path_factory):
    """A tiny random Llama without tokenizer files: token-id prompts only."""
    folder = tmp_path_factory.mktemp("tiny-ids")
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    ref = save_reference(config, folder)
    return LLM(str(folder), **CPU), ref


def test_greedy_text_prompts_equal_transformers_in_input_order(chat_model):
    llm, hf = chat_model
    tok = llm.get_tokenizer()
    # Mixed prompt lengths and output lengths: the long ones finish last, yet come back in order.
    params = [SamplingParams(max_new_tokens=n) for n in (24, 3, 11, 1)]
    outputs = llm.generate(TEXTS, params)
    assert [o.prompt for o in outputs] == TEXTS
    for text, p, out in zip(TEXTS, params, outputs):
        ids = tok(text, add_special_tokens=True)["input_ids"]
        assert out.prompt_token_ids == ids
        completion = out.outputs[0]
        assert completion.token_ids == reference_greedy(hf, ids, p.max_new_tokens), text
        assert completion.text == tok.decode(completion.token_ids)
        assert completion.finish_reason == "length" and out.finished
        assert len(completion.logprobs) == p.max_new_tokens


def test_one_string_and_one_params_for_many(chat_model):
    llm, hf = chat_model
    [out] = llm.generate("Paris", SamplingParams(max_new_tokens=5))
    ids = llm.get_tokenizer()("Paris")["input_ids"]
    assert out.outputs[0].token_ids == reference_greedy(hf, ids, 5)
    many = llm.generate(TEXTS[:3], SamplingParams(max_new_tokens=4))  # one params for every prompt
    assert [len(o.outputs[0].token_ids) for o in many] == [4, 4, 4]
    default = llm.generate(TEXTS[0])  # SamplingParams(): greedy, 20 new tokens
    assert default[0].outputs[0].token_ids == reference_greedy(hf, ids, 20)


def test_token_id_prompts_equal_transformers(ids_model):
    llm, ref = ids_model
    prompts = make_prompts(256, lengths=(5, 23, 9, 40))
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for p, out in zip(prompts, outputs):
        assert out.prompt is None and out.prompt_token_ids == p
        assert out.outputs[0].token_ids == reference_greedy(ref, p, 12)
    # vLLM's dict form is the same prompt.
    [again] = llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert again.outputs[0].token_ids == outputs[1].outputs[0].token_ids


def test_per_prompt_sampling_params(chat_model):
    llm, hf = chat_model
    tok = llm.get_tokenizer()
    greedy = llm.generate("JSON objects hold keys", SamplingParams(max_new_tokens=12))[0].outputs[0].text
    # A stop text greedy decoding first emits mid-way (three characters seen nowhere before).
    start = next(i for i in range(1, len(greedy) - 3) if greedy[i:i + 3] not in greedy[:i + 2])
    stop = greedy[start:start + 3]
    seeded = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.9, top_k=50, seed=7)
    params = [
        seeded,
        SamplingParams(max_new_tokens=12, stop=[stop]),
        SamplingParams(max_new_tokens=3, top_n_tokens=2, prompt_logprobs=True),
        SamplingParams(max_new_tokens=6),
    ]
    prompts = [TEXTS[0], "JSON objects hold keys", TEXTS[2], TEXTS[3]]
    sampled, stopped, detailed, plain = llm.generate(prompts, params)

    # Seeded sampling depends on the seed only, not on the batch it ran in.
    alone = llm.generate(TEXTS[0], seeded)[0].outputs[0]
    assert sampled.outputs[0].token_ids == alone.token_ids and sampled.outputs[0].seed == 7
    # The stop sequence ends its request inside the text greedy decoding would continue.
    assert stopped.outputs[0].finish_reason == "stop_sequence"
    assert stopped.outputs[0].text == greedy[:start + 3]
    # Top-n alternatives and prompt logprobs, against transformers' log-softmax.
    ids = detailed.prompt_token_ids
    with torch.inference_mode():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    want = [logprobs[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
    assert detailed.prompt_logprobs[0] is None
    assert detailed.prompt_logprobs[1:] == pytest.approx(want, abs=1e-4)
    completion = detailed.outputs[0]
    assert completion.token_ids == reference_greedy(hf, ids, 3)
    assert all(len(top) == 2 and top[0][0] == t for top, t in zip(completion.top_logprobs, completion.token_ids))
    assert plain.prompt_logprobs is None and len(plain.outputs[0].token_ids) == 6
    assert plain.outputs[0].token_ids == reference_greedy(hf, tok(TEXTS[3])["input_ids"], 6)


def test_progress_bar_counts_finished_prompts(chat_model, capsys):
    llm, _ = chat_model
    outputs = llm.generate(TEXTS, SamplingParams(max_new_tokens=2), use_tqdm=True)
    assert len(outputs) == len(TEXTS)
    assert f"{len(TEXTS)}/{len(TEXTS)}" in capsys.readouterr().err


def test_dummy_weights_from_a_config(tmp_path):
    LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128).save_pretrained(tmp_path)
    llm = LLM(tmp_path, load_format="dummy", backend="cpu", dtype="float32")
    outputs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outputs] == [5, 5]


# -- keywords ---------------------------------------------------------------------------------

def test_keywords_are_the_serve_flags_with_their_defaults():
    args = engine_args("some/model", max_batch_total_tokens=4096, dtype="bfloat16", cuda_memory_fraction=1)
    assert vars(args) == vars(defaults(model_id="some/model", max_batch_total_tokens=4096, dtype="bfloat16",
                                       cuda_memory_fraction=1.0))
    assert engine_args(max_input_length=100).max_input_tokens == 100  # the flag's alias
    flags = {f.dest for f in FLAGS}
    assert set(NOT_OFFLINE_FLAGS) <= flags  # a renamed server flag must be renamed here too


@pytest.mark.parametrize("kwargs, error, message", [
    ({"max_batch_totl_tokens": 1}, TypeError, "did you mean 'max_batch_total_tokens'"),
    ({"tensor_parallel_size": 2}, TypeError, "unexpected keyword argument 'tensor_parallel_size'"),
    ({"port": 8080}, TypeError, "--port configures the HTTP server"),
    ({"max_stop_sequences": 8}, TypeError, "limits HTTP requests"),
    ({"model_id": "x"}, TypeError, "first argument"),
    ({"block_size": "16"}, TypeError, "'block_size' must be int, not str"),
    ({"disable_prefix_caching": 1}, TypeError, "must be bool"),
    ({"block_size": None}, ValueError, "cannot be None"),
    ({"dtype": "float64"}, ValueError, "'dtype' must be one of"),
    ({"max_input_tokens": 10, "max_input_length": 10}, TypeError, "given already"),
])
def test_bad_keywords_are_refused_before_loading(kwargs, error, message, monkeypatch):
    monkeypatch.setattr("genserve.entrypoints.llm.build_loaded_engine",
                        lambda args: pytest.fail("built an engine despite a bad keyword"))
    with pytest.raises(error, match=message):
        LLM("any/model", **kwargs)


# -- bad inputs -------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, params, error, message", [
    ([1, 2, 3], None, TypeError, "list of lists"),
    ([], None, TypeError, "non-empty"),
    ([[1, 2], [3]], [SamplingParams()], ValueError, "1 sampling_params for 2 prompts"),
    ([[1, 2]], [None], TypeError, "must be SamplingParams"),
    ([[5, 6], []], None, ValueError, "cannot be empty"),
    ([[5, 6], [1, 256]], None, ValueError, "token ids must be >= 0 and < 256"),
    (["text"], None, ValueError, "no tokenizer"),
    ([{"prompt": "a", "prompt_token_ids": [1]}], None, ValueError, "exactly one"),
    ([[5, 6], [1] * 600], None, ValueError, "max_input_tokens is 511"),
    ([[1] * 500], SamplingParams(max_new_tokens=20), ValueError, "max_total_tokens"),
    ([[1, 2]], SamplingParams(max_new_tokens=0), ValueError, "max_new_tokens"),
    ([[1, 2]], SamplingParams(temperature=0.5), ValueError, "only apply with do_sample=True"),
    ([[1, 2]], SamplingParams(do_sample=True, temperature=0.0), ValueError, "temperature must be > 0"),
    ([[1, 2]], SamplingParams(stop=[""]), ValueError, "stop sequences cannot be empty"),
    ([[1, 2]], SamplingParams(adapter_id="nope"), ValueError, "'nope' is not loaded"),
])
def test_bad_inputs_are_refused_before_any_runs(ids_model, prompts, params, error, message, monkeypatch):
    llm, _ = ids_model
    # Every prompt is checked before the first is submitted: a valid one before a bad one never runs.
    monkeypatch.setattr(llm.engine, "add_request", lambda *a: pytest.fail("submitted a request"))
    with pytest.raises(error, match=message):
        llm.generate(prompts, params)


# -- the step loop ----------------------------------------------------------------------------

def test_requests_join_at_their_step_and_come_back_in_order(ids_model):
    llm, ref = ids_model
    prompts = make_prompts(256, lengths=(30, 4, 12))
    requests = [OfflineRequest(p, SamplingParams(max_new_tokens=n, ignore_eos=True), join_step=j)
                for p, n, j in zip(prompts, (4, 10, 6), (5, 0, 2))]
    collector = OutputCollector(requests)
    running = []
    for outputs in iter_steps(llm.engine, requests):
        collector.add(outputs)
        running.append(len(llm.engine.scheduler.running))
    assert running[0] == 1 and max(running) == 3  # the later ones joined a decoding batch
    for p, r, out in zip(prompts, requests, collector.results()):
        assert out.request_id == r.request_id and out.finished
        assert out.outputs[0].token_ids == reference_greedy(ref, p, r.params.max_new_tokens)
    # The same through run_to_completion (request ids are free again once finished).
    assert [o.outputs[0].token_ids for o in run_to_completion(llm.engine, requests)] == \
        [o.outputs[0].token_ids for o in collector.results()]


def test_leaving_the_loop_early_aborts_what_it_added(ids_model):
    llm, _ = ids_model
    requests = [OfflineRequest([5, 6, 7], SamplingParams(max_new_tokens=50, ignore_eos=True)),
                OfflineRequest([8, 9], SamplingParams(max_new_tokens=50, ignore_eos=True), join_step=100)]
    for step, _ in enumerate(iter_steps(llm.engine, requests)):
        if step == 2:
            break
    assert not llm.engine.seqs and not llm.engine.has_work
    assert llm.engine.blocks.num_used == 0


def test_exported_from_the_package():
    assert genserve.LLM is LLM and genserve.SamplingParams is SamplingParams
    assert "LLM" in dir(genserve)
    with pytest.raises(AttributeError):
        genserve.NoSuchThing  # noqa: B018


# -- docs/offline.md --------------------------------------------------------------------------

class _Built(Exception):
    """Raised instead of loading a model the docs name but the tests do not have."""


def test_the_docs_examples_run(smollm2, monkeypatch, tmp_path):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "offline.md").read_text()
    intro, flags, prompts, images, dummy, engine_loop = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    seen = []

    def build(args):  # the embedded model is the session's (fp32, CPU); other models are not loaded
        seen.append(args)
        if args.model_id is None:
            return smollm2
        raise _Built

    monkeypatch.setattr("genserve.entrypoints.llm.build_loaded_engine", build)
    for block in (intro, prompts):
        scope = {}
        exec(block, scope)  # noqa: S102
        assert all(o.finished and o.outputs[0].token_ids for o in scope["outputs"])
    assert scope["outputs"][2].prompt_logprobs[0] is None
    assert len(scope["outputs"][2].outputs[0].top_logprobs[0]) == 3

    with pytest.raises(_Built):
        exec(flags, {"LLM": LLM})  # noqa: S102
    a = seen[-1]
    assert (a.model_id, a.dtype, a.backend, a.max_total_tokens, a.max_batch_total_tokens, a.num_shard,
            a.lora_adapters) == ("./my-llama", "bfloat16", "cuda", 4096, 65536, 2, "sql=./sql-adapter")
    with pytest.raises(_Built):  # the images example (run for real in tests/multimodal/test_offline_images.py)
        exec(images, {})  # noqa: S102
    assert (seen[-1].model_id, seen[-1].dtype, seen[-1].backend) == ("HuggingFaceM4/idefics2-8b", "bfloat16", "cuda")
    with pytest.raises(_Built):
        exec(dummy.replace("/tmp/llama-8b-shape", str(tmp_path)), {})  # noqa: S102
    assert (seen[-1].model_id, seen[-1].load_format) == (str(tmp_path), "dummy")

    scope = {"engine": smollm2.engine}
    exec(engine_loop, scope)  # noqa: S102
    assert [len(r.outputs[0].token_ids) <= n for r, n in zip(scope["results"], (8, 4))] == [True, True]
