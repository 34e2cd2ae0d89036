"""The tiny random Llama several engine tests share (its checkpoint: ``conftest.checkpoint``)."""

from transformers import LlamaConfig

VOCAB = 256


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False)
