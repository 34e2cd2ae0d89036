"""The neuron backend's own flags, on top of the options every backend reads."""

from __future__ import annotations

from dataclasses import dataclass

from genserve.args import Flag
from genserve.backends.options import BackendOptions, backend_flag, size_list


@dataclass(frozen=True)
class NeuronOptions(BackendOptions):
    # HBM of one NeuronCore, used only when the runtime does not report memory (e.g. Trn2
    # logical cores); None: 16 GiB (a NeuronCore-v2 of Inf2/Trn1).
    hbm_bytes: int | None = backend_flag(Flag(
        "--neuron-hbm-bytes", int, None, "HBM of one NeuronCore in bytes, where the Neuron runtime "
        "does not report it (default: 16 GiB, a NeuronCore-v2)"))
    # Bucket sizes (``buckets.make_buckets``); empty: derived from the engine's limits.
    decode_batch: tuple[int, ...] = backend_flag(Flag(
        "--neuron-decode-batch", size_list, None, "Decode batch sizes to compile, e.g. 1,2,4,8 "
        "(default: --cuda-graphs, else powers of two up to min(--max-batch-size, 32))"), sizes=True)
    prefill_batch: tuple[int, ...] = backend_flag(Flag(
        "--neuron-prefill-batch", size_list, None, "Prefill batch sizes to compile (default: 1)"), sizes=True)
    prefill_len: tuple[int, ...] = backend_flag(Flag(
        "--neuron-prefill-len", size_list, None, "Prefill chunk lengths in tokens to compile (default: "
        "powers of two up to the prefill budget)"), sizes=True)
    context_len: tuple[int, ...] = backend_flag(Flag(
        "--neuron-context-len", size_list, None, "Context lengths in tokens to compile, rounded up to "
        "blocks (default: powers of two up to --max-total-tokens)"), sizes=True)
