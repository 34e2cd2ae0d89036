"""A model's Hugging Face config and tokenizer, read from its resolved source (directory or GGUF)."""

from __future__ import annotations

import json
import logging

from genserve.loader.source import ModelSource

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_config(src: ModelSource, args):
    """``AutoConfig`` for ``src``, with --rope-scaling/--rope-factor applied (both the legacy
    ``rope_scaling`` and transformers 5's ``rope_parameters``)."""
    from transformers import AutoConfig

    kwargs: dict[str, object] = {"trust_remote_code": bool(getattr(args, "trust_remote_code", False))}
    if src.is_gguf:
        kwargs["gguf_file"] = src.gguf_file
    config = AutoConfig.from_pretrained(str(src.path), **kwargs)
    if getattr(args, "rope_scaling", None):
        factor = args.rope_factor or 1.0
        config.rope_scaling = {"rope_type": args.rope_scaling, "factor": factor}
        params = dict(getattr(config, "rope_parameters", None) or {})
        params.update({"rope_type": args.rope_scaling, "factor": factor})
        config.rope_parameters = params
    return config


def load_tokenizer(src: ModelSource, args):
    """``AutoTokenizer`` for ``src`` (the chat template of --tokenizer-config-path, when given),
    or None where the checkpoint has no tokenizer files (the server then takes token ids only)."""
    from transformers import AutoTokenizer

    kwargs: dict[str, object] = {"trust_remote_code": bool(getattr(args, "trust_remote_code", False))}
    if src.is_gguf:
        kwargs["gguf_file"] = src.gguf_file
    elif not any((src.path / f).exists() for f in TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: serving token ids only", src.path)
        return None
    tok = AutoTokenizer.from_pretrained(str(src.path), **kwargs)
    path = getattr(args, "tokenizer_config_path", None)
    if path:
        with open(path) as f:
            template = json.load(f).get("chat_template")
        if template:
            tok.chat_template = template
    return tok


def eos_ids(tokenizer, config) -> set[int]:
    """Every end-of-sequence id the config, its generation config and the tokenizer name."""
    ids = set()
    for source in (getattr(config, "eos_token_id", None),
                   getattr(getattr(config, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(source)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
