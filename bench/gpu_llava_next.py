"""Issue-13 §6 benchmark: Llava-Next-Mistral-7B shape (CLIP ViT-L/14-336 + Mistral-7B), bf16,
random weights, on one GPU; genserve (engine API, no HTTP) against transformers'
``LlavaNextForConditionalGeneration.generate`` on the same shape in the same run.

Figures (printed and appended to ``bench/results/<gpu>.jsonl`` like bench/gpu_llama8b.py):
  ttft_llava_672_ms         one 672x672 image (anyres 2x2 tiles + base: 2,928 image tokens) plus a
                            ~100-token text prompt, time to the first token (median of 5); the
                            image preprocessing (processor) is timed apart: preprocess_672_ms
  out_tok_s_llava_64x128    64 concurrent requests, each its own 672x672 image and ~100 text
                            tokens, 128 new tokens each (greedy, EOS ignored): output tokens/s

    python bench/gpu_llava_next.py                # H200: both engines
    python bench/gpu_llava_next.py --skip-hf      # genserve only
    python bench/gpu_llava_next.py --tiny         # a tiny model on the CPU, to check the script
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_llama8b import Recorder  # noqa: E402  (one results format for every bench)

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
MISTRAL_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)
PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
WORDS = ("describe the picture in detail and say what is unusual about the colours shapes and light "
         "in every corner of it").split()


def write_checkpoint(folder: str, tiny: bool) -> None:
    """config.json (weights come from --load-format dummy / random init) and the processor."""
    from genserve.multimodal import testing
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    tok = testing.build_tokenizer(folder)
    image_id = tok.convert_tokens_to_ids(testing.IMAGE_TOKEN)
    if tiny:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=28, patch_size=14, projection_dim=16)
        text = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
        pinpoints, side = testing.PINPOINTS, 28
    else:
        vision, text = CLIPVisionConfig(**CLIP_L_336), MistralConfig(**MISTRAL_7B)
        pinpoints, side = PINPOINTS_336, 336
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_id,
                             image_grid_pinpoints=pinpoints, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
    config.save_pretrained(folder)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                              image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=testing.CHAT_TEMPLATE).save_pretrained(folder)


def prompt_text(processor, n_text: int) -> str:
    """"<image>\\n" and words until the text alone is ``n_text`` tokens (or just over)."""
    words: list[str] = []
    while len(processor.tokenizer(" ".join(words))["input_ids"]) < n_text:
        words.append(WORDS[len(words) % len(WORDS)])
    return processor.image_token + "\n" + " ".join(words)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- genserve -------------------------------------------------------------------------------
def genserve_suite(folder, args, rec, images, text):
    from genserve.args import defaults
    from genserve.engine.build import build_engine
    from genserve.engine.offline import OfflineRequest, iter_steps
    from genserve.engine.sampling_params import SamplingParams
    from genserve.engine.warmup import warm_up
    from genserve.multimodal.inputs import MultiModalInputs
    from genserve.multimodal.processor import MultiModalProcessor

    loaded = build_engine(defaults(model_id=folder, load_format="dummy", backend=args.backend,
                                   dtype="float32" if args.tiny else "bfloat16",
                                   max_batch_prefill_tokens=args.prefill_chunk, cuda_memory_fraction=0.9))
    engine = loaded.engine
    warm_up(engine, engine.runner.vocab_size)
    mm = MultiModalProcessor.load(folder, engine.runner.model.image_token_id)
    print(f"genserve: backend {loaded.backend.name}, attention {loaded.attention}, "
          f"KV blocks {engine.blocks.num_blocks}, load {loaded.load_seconds:.1f}s", flush=True)

    t0 = time.perf_counter()
    prepared = [mm.process(text, [img], add_special_tokens=True) for img in images]
    rec("preprocess_672_ms", (time.perf_counter() - t0) / len(images) * 1e3, "ms", "genserve",
        note="LlavaNextProcessor, per image, on the host")
    ids0, inputs0 = prepared[0]
    assert inputs0 is not None
    print(f"prompt: {len(ids0)} tokens, {len(inputs0.positions)} of them image tokens", flush=True)

    def run(batch, new_tokens):
        """(wall s, output tokens, first-token seconds per request); fresh image inputs (the
        vision encoder runs for every request) and an empty prefix cache."""
        engine.blocks.reset_prefix_cache()
        gc.collect()
        sync()
        t0 = time.perf_counter()
        reqs = [OfflineRequest(ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True,
                                                   multimodal=MultiModalInputs(inp.data, inp.positions, 1)),
                               request_id=f"v{t0}-{i}")
                for i, (ids, inp) in enumerate(batch)]
        first: dict[str, float] = {}
        produced = 0
        for outs in iter_steps(engine, reqs):
            for out in outs:
                first.setdefault(out.request_id, time.perf_counter() - t0)
                produced += len(out.tokens)
        return time.perf_counter() - t0, produced, list(first.values())

    run(prepared[:2], 2)  # warm-up: the vision path's kernels and cuBLAS heuristics
    samples = sorted(run([prepared[0]], 1)[2][0] * 1e3 for _ in range(5))
    rec("ttft_llava_672_ms", samples[len(samples) // 2], "ms", "genserve",
        prompt_tokens=len(ids0), image_tokens=len(inputs0.positions), samples_ms=[round(s, 2) for s in samples])
    wall, produced, _ = run(prepared[:args.concurrency], args.new_tokens)
    rec(f"out_tok_s_llava_{args.concurrency}x{args.new_tokens}", produced / wall, "tok/s", "genserve",
        wall_s=round(wall, 3))
    # The engine's memory goes with this frame (main collects before transformers loads).


# -- transformers ---------------------------------------------------------------------------
def transformers_suite(folder, args, rec, images, text):
    from transformers import (
        AutoConfig,
        AutoProcessor,
        LlavaNextForConditionalGeneration,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    processor = AutoProcessor.from_pretrained(folder)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(AutoConfig.from_pretrained(folder), dtype=dtype).eval()

    def gen(batch_images, new_tokens):
        inputs = processor(text=[text] * len(batch_images), images=batch_images, return_tensors="pt",
                           padding=True).to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
        sync()
        return time.perf_counter() - t0

    gen(images[:1], 2)  # warm-up
    samples = sorted(gen(images[:1], 1) * 1e3 for _ in range(3))
    rec("ttft_llava_672_ms", samples[1], "ms", "transformers", note="generate(max_new_tokens=1), processor excluded")
    wall = gen(images[:args.concurrency], args.new_tokens)
    rec(f"out_tok_s_llava_{args.concurrency}x{args.new_tokens}", args.concurrency * args.new_tokens / wall,
        "tok/s", "transformers", wall_s=round(wall, 3), note="one padded batch")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--backend", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--concurrency", type=int, default=None, help="default 64 (4 with --tiny)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (8 with --tiny)")
    ap.add_argument("--text-tokens", type=int, default=100)
    ap.add_argument("--prefill-chunk", type=int, default=8192)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    args.backend = args.backend or ("cpu" if args.tiny else "cuda")
    args.concurrency = args.concurrency or (4 if args.tiny else 64)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 128)

    from genserve.multimodal.testing import random_image
    from transformers import AutoProcessor

    folder = tempfile.mkdtemp(prefix="genserve-bench-llava-")
    write_checkpoint(folder, args.tiny)
    text = prompt_text(AutoProcessor.from_pretrained(folder), args.text_tokens)
    images = [random_image(672, 672, seed=i) for i in range(args.concurrency)]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rec = Recorder(gpu + ("-tiny" if args.tiny else ""), args.out)
    print(f"device {gpu}, torch {torch.__version__}, commit {rec.meta['commit']}", flush=True)
    genserve_suite(folder, args, rec, images, text)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not args.skip_hf:
        transformers_suite(folder, args, rec, images, text)
    print("\nsummary (jsonl at %s)" % rec.path)
    for r in rec.rows:
        print(f"  {r['engine']:13s} {r['metric']:28s} {r['value']:>12} {r['unit']}")


if __name__ == "__main__":
    sys.exit(main())
