"""Tiny random Llava-Next checkpoints, built offline in seconds, for tests and ``--tiny`` benches.

The checkpoint is what transformers writes (``save_pretrained`` of
``LlavaNextForConditionalGeneration`` with tiny CLIP and Llama configs) plus a
``LlavaNextProcessor`` over a byte-level BPE trained here, with ``<image>`` added as a special
token and a Llava-Next-Mistral-style chat template (images first in a user turn).
"""

from __future__ import annotations

import io
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Describe this image. What is in the picture? A cat, a dog, a red square and a blue sky.",
    "A language model predicts the next token from the tokens before it, one step at a time.",
]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    " [/INST]{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %} {% endif %}"
)
# Tiles of 28x28 pixels (2x2 patches of 14): the anyres grids are 1x2, 2x1 and 2x2 tiles.
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def build_tokenizer(folder: Path, extra_specials: tuple[str, ...] = ()):
    """A byte-level BPE (``tokenizers``) as a ``PreTrainedTokenizerFast`` with
    ``extra_specials``, then ``<image>``, as its last special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": [*extra_specials, IMAGE_TOKEN]})
    return fast


def _text_config(config_cls, tok, layers: int = 2):
    """The tiny language model every test VLM sits on (``config_cls``: LlamaConfig, MistralConfig)."""
    return config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _save_perturbed(model_cls, config, seed: int, folder: Path):
    """``model_cls(config)`` in fp32 eval mode with every weight perturbed (so norms and biases
    leave 1 and 0 and every tensor matters), saved to ``folder``."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def build_tiny_llava_next(folder, seed: int = 0, vision_layers: int = 2, text_layers: int = 2):
    """Write a tiny random Llava-Next checkpoint with its processor to ``folder``; returns the
    transformers model (fp32, eval). Weights are perturbed from the default init so that every
    tensor matters (norms and biases away from 1 and 0)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                              num_attention_heads=4, image_size=28, patch_size=14, projection_dim=16)
    text = _text_config(LlamaConfig, tok, text_layers)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    model = _save_perturbed(LlavaNextForConditionalGeneration, config, seed, folder)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                              image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return model


def random_image(width: int, height: int, seed: int = 0):
    """A ``PIL.Image`` of random RGB noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def png_bytes(image, fmt: str = "PNG") -> bytes:
    """A ``PIL.Image`` encoded in ``fmt`` (PNG by default)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_url(image, fmt: str = "PNG") -> str:
    """``data:image/<fmt>;base64,...`` of a ``PIL.Image``."""
    import base64

    return f"data:image/{fmt.lower()};base64,{base64.b64encode(png_bytes(image, fmt)).decode()}"


def build_tiny_idefics3(folder, seed: int = 0, do_image_splitting: bool = True):
    """A tiny random Idefics3 checkpoint with its ``Idefics3Processor`` in ``folder``: tiles of
    56x56 pixels (4x4 patches of 14), pixel shuffle by 2, so 4 image tokens per tile; images
    are resized to a longest edge of 112, i.e. split into at most 2x2 tiles plus the global
    view. Returns the transformers model (fp32, eval), weights perturbed as above."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 112}, max_image_size={"longest_edge": 56},
                                             do_image_splitting=do_image_splitting)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATE.replace("<image>\n", "<image>"))
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=56, patch_size=14)
    text = _text_config(LlamaConfig, tok)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=processor.image_token_id)
    model = _save_perturbed(Idefics3ForConditionalGeneration, config, seed, folder)
    processor.save_pretrained(folder)
    return model


def build_tiny_idefics2(folder, seed: int = 0, do_image_splitting: bool = True):
    """A tiny random Idefics2 checkpoint with its ``Idefics2Processor`` in ``folder``: images
    resized to edges between 28 and 70 pixels (so of varying size, padded and masked within a
    request), 8 resampler latents per image or crop. Returns the transformers model."""
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessor,
        Idefics2Processor,
        MistralConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    image_processor = Idefics2ImageProcessor(size={"shortest_edge": 28, "longest_edge": 70},
                                             do_image_splitting=do_image_splitting)
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=8,
                                  chat_template=CHAT_TEMPLATE.replace("<image>\n", "<image>"))
    text = _text_config(MistralConfig, tok)
    config = Idefics2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 70, "patch_size": 14},
        perceiver_config={"hidden_size": 64, "rms_norm_eps": 1e-5, "resampler_n_latents": 8,
                          "resampler_depth": 2, "resampler_n_heads": 4, "resampler_head_dim": 16,
                          "num_key_value_heads": 2},
        text_config=text, image_token_id=processor.image_token_id)
    model = _save_perturbed(Idefics2ForConditionalGeneration, config, seed, folder)
    processor.save_pretrained(folder)
    return model


IDEFICS_FAKE_TOKEN = "<fake_token_around_image>"
# Transformers' IdeficsProcessor keeps no chat template (its __init__ drops one, and a saved
# one loads onto the tokenizer), so the tiny checkpoint's is the tokenizer's, over string
# contents with <image> where each image goes: TGI's idefics-instruct prompt shape.
IDEFICS_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:{{ message['content'] }}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tiny_idefics(folder, seed: int = 0, qk_layer_norms: bool = True, cross_layer_interval: int = 2,
                       initializer_range: float = 0.3):
    """A tiny random Idefics (v1) checkpoint with its ``IdeficsProcessor`` in ``folder``: a
    CLIP-style encoder over 28x28 images (2x2 patches of 14), a Perceiver resampler to 4
    latents, 4 Llama layers with a gated cross-attention layer before every
    ``cross_layer_interval``-th, and the decoupled vocabulary of the real checkpoints (the last
    two ids, ``<fake_token_around_image>`` and ``<image>``, in ``additional_embedding`` /
    ``additional_fc``). The gates start at 1 (then perturbed) and the weights are drawn with a
    large ``initializer_range``, so the images matter in the logits and greedy outputs vary
    (upstream's zero gates would hide the cross-attention, its 0.02 init repeats one token).
    Returns the transformers model (fp32, eval)."""
    from transformers import (
        IdeficsConfig,
        IdeficsForVisionText2Text,
        IdeficsImageProcessor,
        IdeficsProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, (IDEFICS_FAKE_TOKEN,))  # the ids of HuggingFaceM4/idefics-9b's order
    extra = [tok.convert_tokens_to_ids(t) for t in (IDEFICS_FAKE_TOKEN, IMAGE_TOKEN)]
    if extra != [len(tok) - 2, len(tok) - 1]:
        raise RuntimeError(f"the image tokens are not the tokenizer's last two ids: {extra}, {len(tok)}")
    image_processor = IdeficsImageProcessor(image_size=28)
    tok.chat_template = IDEFICS_CHAT_TEMPLATE
    processor = IdeficsProcessor(image_processor=image_processor, tokenizer=tok)
    config = IdeficsConfig(
        vocab_size=len(tok) - 2, additional_vocab_size=2, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
        cross_layer_interval=cross_layer_interval, qk_layer_norms=qk_layer_norms, alpha_initializer="ones",
        alpha_type="vector", use_resampler=True, tie_word_embeddings=False, freeze_text_layers=False,
        freeze_vision_layers=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, initializer_range=initializer_range,
        vision_config={"embed_dim": 32, "image_size": 28, "patch_size": 14, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        perceiver_config={"use_resampler": True, "resampler_n_latents": 4, "resampler_depth": 2,
                          "resampler_n_heads": 2, "resampler_head_dim": 8,
                          "qk_layer_norms_perceiver": qk_layer_norms})
    model = _save_perturbed(IdeficsForVisionText2Text, config, seed, folder)
    processor.save_pretrained(folder)
    return model


def reference_greedy(ref, out, n: int) -> list[int]:
    """transformers' greedy continuation of ``n`` tokens (EOS ignored) for processor output
    ``out`` (one prompt), as token ids: the reference the vision-language tests compare to."""
    import torch

    with torch.inference_mode():
        g = ref.generate(**out, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return g[0, out["input_ids"].shape[1]:].tolist()


def image_prompt_logits(engine, ids: list[int], inputs):
    """genserve's logits ``[len(ids), vocab]`` (fp32) for every row of one prompt with images
    (``inputs``: its ``MultiModalInputs``), through the paged cache and the step's image inputs,
    as a prefill step computes them; the probe's blocks are freed afterwards."""
    import torch

    from genserve.engine.sampling_params import SamplingParams
    from genserve.engine.scheduler import ScheduledSeq
    from genserve.engine.sequence import Sequence
    from genserve.models.base import ForwardBatch
    from genserve.multimodal.rows import image_rows

    seq = Sequence("probe", list(ids), SamplingParams(max_new_tokens=1, multimodal=inputs))
    engine.blocks.allocate(seq)
    seq.num_computed = 0
    try:
        with torch.inference_mode():
            runner = engine.runner
            scheduled = [ScheduledSeq(seq, len(ids))]
            prep = runner.prepare(scheduled)
            batch = ForwardBatch(prep.attn, runner.kv_caches,
                                 images=image_rows(runner.model, scheduled, runner.device))
            return runner.compute_logits(runner.forward(prep.input_ids, prep.positions, batch)).float()
    finally:
        engine.blocks.free_seq(seq)
