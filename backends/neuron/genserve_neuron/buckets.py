"""The static shapes a Neuron model is compiled for.

Neuron runs compiled graphs with fixed shapes: every distinct input shape is one more
neuronx-cc compilation (minutes for a real model). So each step's batch is padded up to a
*bucket* ``(batch, q_len, blocks)``: ``batch`` sequences, each with ``q_len`` query rows
(1 for decode), and a block table ``blocks`` wide (the longest context it can see is
``blocks * block_size`` tokens). Decode and prefill use separate batch-size lists because a
decode bucket is cheap per sequence and a prefill bucket is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from genserve_neuron.options import NeuronOptions


@dataclass(frozen=True, order=True)
class Bucket:
    batch: int
    q_len: int
    blocks: int


def _smallest_at_least(values: tuple[int, ...], n: int, what: str) -> int:
    for v in values:
        if v >= n:
            return v
    raise ValueError(f"no {what} bucket holds {n} (largest is {values[-1]})")


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2*lo, 4*lo, ... up to the first value >= hi."""
    out, v = [], max(1, lo)
    while True:
        out.append(v)
        if v >= hi:
            return tuple(out)
        v *= 2


@dataclass(frozen=True)
class Buckets:
    decode_batch: tuple[int, ...]
    prefill_batch: tuple[int, ...]
    prefill_len: tuple[int, ...]
    context_blocks: tuple[int, ...]
    block_size: int

    def __post_init__(self):
        for name in ("decode_batch", "prefill_batch", "prefill_len", "context_blocks"):
            values = getattr(self, name)
            if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
                raise ValueError(f"{name} buckets must be increasing positive sizes, got {values}")

    @property
    def max_decode_batch(self) -> int:
        return self.decode_batch[-1]

    @property
    def max_prefill_batch(self) -> int:
        return self.prefill_batch[-1]

    def pick(self, n_seqs: int, max_q: int, max_blocks: int) -> Bucket:
        """The smallest bucket holding ``n_seqs`` sequences of up to ``max_q`` new tokens."""
        decode = max_q == 1
        batch = _smallest_at_least(self.decode_batch if decode else self.prefill_batch, n_seqs, "batch")
        q_len = 1 if decode else _smallest_at_least(self.prefill_len, max_q, "prefill length")
        blocks = _smallest_at_least(self.context_blocks, max_blocks, "context")
        return Bucket(batch, q_len, blocks)

    def all(self) -> list[Bucket]:
        """Every bucket a step can pick: the graphs to compile ahead of serving."""
        out = [Bucket(b, 1, w) for b in self.decode_batch for w in self.context_blocks]
        # A prefill chunk of q tokens needs a context of at least q tokens.
        out += [Bucket(b, q, w) for b in self.prefill_batch for q in self.prefill_len
                for w in self.context_blocks
                if q <= w * self.block_size or w == self.context_blocks[-1]]
        return sorted(set(out))


def make_buckets(options: NeuronOptions, config) -> Buckets:
    """Buckets from the backend's options, defaulting to what the engine limits can produce.

    ``options.decode_batch``, ``prefill_batch``, ``prefill_len`` (tokens) and ``context_len``
    (tokens; rounded up to blocks): --neuron-* flags. ``graph_sizes`` (TGI's --cuda-graphs,
    "batch sizes to capture") sets the decode batch sizes when --neuron-decode-batch does not.
    The largest bucket of each kind is raised to cover the engine's limits, so every
    schedulable step fits some bucket.
    """
    bs = config.block_size
    sched = config.scheduler
    max_chunk = min(sched.max_batch_prefill_tokens, config.max_total_tokens)
    max_blocks = -(-config.max_total_tokens // bs)

    decode_batch = (options.decode_batch or options.graph_sizes
                    or powers_of_two(1, min(sched.max_batch_size, 32)))
    prefill_batch = options.prefill_batch or (1,)
    prefill_len = options.prefill_len or powers_of_two(min(128, max_chunk), max_chunk)
    context_tokens = options.context_len or powers_of_two(min(512, config.max_total_tokens),
                                                          config.max_total_tokens)
    context_blocks = tuple(sorted({-(-t // bs) for t in context_tokens}))

    # Never leave a schedulable step without a bucket: extend the top of each list.
    if prefill_len[-1] < max_chunk:
        prefill_len += (max_chunk,)
    if context_blocks[-1] < max_blocks:
        context_blocks += (max_blocks,)
    return Buckets(decode_batch, prefill_batch, prefill_len, context_blocks, bs)
