"""A tiny random Llama with a real byte-level BPE tokenizer, built offline in a few seconds.

The model never emits its EOS token (``<|im_end|>``): residual dimension 0 is held at a
positive constant (embeddings set it, no layer writes to it) and the EOS row of ``lm_head``
reads only that dimension with a large negative weight. Every request on it therefore runs to
``max_new_tokens`` or a stop sequence, which makes lengths, usage counts and disconnect tests
deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is in Italy.",
    "A language model predicts the next token from the tokens before it, one step at a time.",
    "Servers batch many requests together so the accelerator stays busy while clients wait.",
    "JSON objects hold keys and values: {\"name\": \"Ada\", \"age\": 36, \"ok\": true}.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2024 appear in many documents.",
    "Héllo wörld, naïve café, 東京 and emoji 🚀 show that text is not only ASCII.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools:\n{{ tools | tojson }}<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(folder: Path, vocab_size: int = 400, metaspace: bool = False) -> int:
    """Train a byte-level BPE on CORPUS; write tokenizer.json + tokenizer_config.json. With
    ``metaspace``, a SentencePiece-style one instead ("▁" marks spaces, a Metaspace decoder),
    which llguidance cannot load."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if metaspace:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return tok.get_vocab_size()


def build_tiny_llama(folder: Path, max_position_embeddings: int = 4096, seed: int = 0,
                     model_vocab: int | None = None, metaspace: bool = False) -> Path:
    """``model_vocab`` smaller than the tokenizer's makes a deliberately faulty model: prompts
    with the high token ids fail inside the engine (a real generation error, HTTP 424)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(folder, metaspace=metaspace)
    eos = SPECIALS.index("<|im_end|>")
    config = LlamaConfig(vocab_size=model_vocab or vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, eos_token_id=eos, bos_token_id=None,
                         pad_token_id=SPECIALS.index("<|endoftext|>"))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init: livelier logits
            p.add_(torch.randn_like(p) * 0.05)
        model.model.embed_tokens.weight[:, 0] = 0.5
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[eos, :] = 0.0
        model.lm_head.weight[eos, 0] = -100.0
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def build_lora_adapter(folder: Path, base: Path, rank: int = 2) -> Path:
    """A PEFT-format LoRA adapter (q_proj/v_proj) for the tiny Llama."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((base / "config.json").read_text())
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {"q_proj": hidden, "v_proj": hidden // heads * kv}
    tensors = {}
    g = torch.Generator().manual_seed(1)
    for i in range(cfg["num_hidden_layers"]):
        for name, dim in out.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(dim, rank, generator=g) * 0.1
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(out),
        "base_model_name_or_path": str(base), "bias": "none", "task_type": "CAUSAL_LM",
    }))
    return folder
