"""From flags to a ``Speculator``: which proposer, built how, checked against the model."""

from __future__ import annotations

import logging

from genserve.errors import ConfigError
from genserve.spec_decode.base import Proposer, ProposerContext
from genserve.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)


def resolve(args, hf_config) -> SpeculativeConfig | None:
    """The speculative settings the flags ask for, or None (off: ``--speculate`` 0, or unset
    with no ``--speculative-model`` and no Medusa heads).

    Method: ``--speculative-method`` when given; else TGI's rule, Medusa heads when the
    checkpoint has them (``medusa_num_heads`` in its config: they are used unless
    ``--speculate 0``, as in TGI), n-gram otherwise, and a draft model when
    ``--speculative-model`` names one. ``--speculate`` defaults to the number of Medusa heads
    with Medusa (TGI), else 4. Raises ``ConfigError`` for a negative count or a threshold
    below 1.
    """
    k = args.speculate
    model = getattr(args, "speculative_model", None)
    method = getattr(args, "speculative_method", None)
    heads = getattr(hf_config, "medusa_num_heads", None)
    if not k and not model and not method and not (heads and k is None):
        return None
    if k is not None and k < 0:
        raise ConfigError(f"--speculate {k}: must be >= 0")
    if k == 0:
        if model or method:
            raise ConfigError("--speculate 0 turns speculation off; drop --speculative-model/-method")
        return None
    if method is None:
        if model:
            method = "draft_model"
        elif heads:
            method = "medusa"
        else:
            method = "ngram"
    method = method.lower()
    max_batch = getattr(args, "speculative_max_batch_size", None)
    if max_batch is not None and max_batch < 1:
        raise ConfigError(f"--speculative-max-batch-size {max_batch}: must be >= 1")
    kwargs = {} if max_batch is None else {"max_batch_size": max_batch}
    if not k:
        k = (heads if method == "medusa" else None) or 4
    return SpeculativeConfig(num_tokens=k, method=method, model=model, **kwargs)


def create_proposer(config: SpeculativeConfig, ctx: ProposerContext, plugins) -> Proposer:
    """Build the registered proposer ``config.method``. Raises ``ConfigError`` when none is
    registered under that name, or when it refuses this model."""
    registry = plugins.spec_proposers
    if config.method not in registry:
        known = ", ".join(registry) or "none"
        raise ConfigError(f"speculative method {config.method!r} is not available "
                          f"(registered proposers: {known})")
    proposer_cls: type[Proposer] = registry.get(config.method)
    proposer = proposer_cls.create(ctx)
    logger.info("speculative decoding: %s, up to %d tokens per step, off above %d decoding sequences",
                config.method, config.num_tokens, config.max_batch_size)
    return proposer
