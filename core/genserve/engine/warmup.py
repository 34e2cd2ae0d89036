"""Run each kind of step serving will see once, before the first request.

GPU kernels (Triton) compile on first use of each variant, and cuBLAS/cuDNN pick their
algorithms on first call: left to the first requests, that costs them seconds (what it cost on
an H100: docs/benchmarks.md, "Measurements behind design choices"). Runners whose kernels
compile lazily say so with ``lazy_kernels``;
the others just run one short generation to prove the engine works.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from genserve.engine.offline import OfflineRequest, run_to_completion
from genserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from genserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

# Short prompt lengths. Every warm-up prompt starts with a different token (``_prompt``'s seed),
# so none hits another in the prefix cache and each prefill is of a fresh prompt.
SHORT = (5, 9, 12, 15)


def warm_up(engine: LLMEngine, vocab_size: int) -> None:
    t0 = time.perf_counter()
    if not engine.runner.lazy_kernels:
        run_to_completion(engine, [OfflineRequest(_prompt(0, SHORT[0], vocab_size), SamplingParams(max_new_tokens=2),
                                                  request_id="genserve-warmup")])
        return
    cfg = engine.config
    long_len = min(cfg.max_input_tokens, cfg.scheduler.max_batch_prefill_tokens)
    # 1. A long fresh prompt (the prefill kernels' large-tile variants), then decoding over a
    #    long context at batch 1 (split-K decode attention).
    _run(engine, [_prompt(1, long_len, vocab_size)], max_new_tokens=3)
    #    And a long prompt beside a short one (kernels may pick tiles by the longest prompt, and
    #    libraries serve only batches of long prompts).
    _run(engine, [_prompt(2, long_len // 2, vocab_size), _prompt(3, SHORT[0], vocab_size)], max_new_tokens=1)
    # 2. Several short fresh prompts at once, then small decode batches.
    _run(engine, [_prompt(4 + i, n, vocab_size) for i, n in enumerate(SHORT)], max_new_tokens=3)
    # 3. A prompt joining a running sequence: a mixed step, attention over the paged cache.
    _run(engine, [_prompt(10, SHORT[1], vocab_size)], max_new_tokens=6,
         joining=[_prompt(11, SHORT[2], vocab_size)])
    engine.blocks.reset_prefix_cache()
    logger.info("warmed up (prefill of %d tokens, short prompts, mixed steps) in %.1f s",
                long_len, time.perf_counter() - t0)


def _prompt(seed: int, n: int, vocab_size: int) -> list[int]:
    # Any id below the vocabulary size is a valid embedding row; vary them per prompt.
    return [(seed * 1_000_003 + i * 7919) % vocab_size for i in range(n)]


def _run(engine: LLMEngine, prompts: list[list[int]], max_new_tokens: int,
         joining: Sequence[list[int]] = ()) -> None:
    """Run ``prompts`` together; ``joining`` join them before the third step (after one prefill
    step and one decode step), so their prefill shares a step with a decode."""
    def request(ids: list[int], join_step: int) -> OfflineRequest:
        cfg = engine.config
        ids = ids[:cfg.max_input_tokens]
        new = max(1, min(max_new_tokens, cfg.max_total_tokens - len(ids)))
        return OfflineRequest(ids, SamplingParams(max_new_tokens=new, ignore_eos=True), join_step=join_step)

    run_to_completion(engine, [request(ids, 0) for ids in prompts] + [request(ids, 2) for ids in joining])
