"""Prometheus metrics: TGI's names (so its dashboards work) plus ``genserve_*`` engine gauges.

Histograms and gauges are prometheus-client objects in a per-app registry. Counters are
rendered by a small collector of our own because TGI's counters carry no ``_total`` suffix
(``tgi_request_count``), which prometheus-client would add. Engine state (KV blocks, queue)
is read at scrape time; batch metrics come from the engine's per-step listener.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

DURATION = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Counters:
    """Monotonic counters with optional labels, rendered in Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self._help: dict[str, str] = {}
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)

    def declare(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self, extra: dict[str, float] | None = None) -> str:
        lines = []
        with self._lock:
            values = {k: dict(v) for k, v in self._values.items()}
        for name, help_text in self._help.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} counter")
            series = values.get(name) or {(): 0.0}
            if extra and name in extra:
                series = {(): extra[name]}
            for key, v in sorted(series.items()):
                label = ",".join(f'{k}="{val}"' for k, val in key)
                lines.append(f"{name}{{{label}}} {v:g}" if label else f"{name} {v:g}")
        return "\n".join(lines) + "\n"


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.counters = c = Counters()
        c.declare("tgi_request_count", "Requests received")
        c.declare("tgi_request_success", "Requests that succeeded")
        c.declare("tgi_request_failure", "Requests that failed, by error type")
        c.declare("tgi_batch_inference_count", "Engine steps, by method")
        c.declare("tgi_batch_inference_success", "Engine steps that succeeded, by method")
        c.declare("genserve_preemptions", "Sequences preempted for lack of KV blocks")
        c.declare("genserve_spec_proposed_tokens", "Speculative tokens proposed")
        c.declare("genserve_spec_accepted_tokens", "Speculative tokens accepted")
        h = lambda name, doc, buckets=DURATION, labels=(): Histogram(  # noqa: E731
            name, doc, labelnames=labels, buckets=buckets, registry=r)
        self.request_duration = h("tgi_request_duration", "End-to-end request time (s)")
        self.validation_duration = h("tgi_request_validation_duration", "Validation time (s)")
        self.queue_duration = h("tgi_request_queue_duration", "Time waiting before the first step (s)")
        self.inference_duration = h("tgi_request_inference_duration", "Time in the model (s)")
        self.time_per_token = h("tgi_request_mean_time_per_token_duration", "Mean inter-token latency (s)")
        self.input_length = h("tgi_request_input_length", "Prompt tokens", TOKENS)
        self.max_new_tokens = h("tgi_request_max_new_tokens", "max_new_tokens of requests", TOKENS)
        self.generated_tokens = h("tgi_request_generated_tokens", "Generated tokens", TOKENS)
        self.skipped_tokens = h("tgi_request_skipped_tokens", "Speculated tokens accepted", TOKENS)
        self.acceptance_rate = h("genserve_request_spec_acceptance_rate",
                                 "Share of a request's speculative proposals accepted", RATE)
        self.batch_next_size = h("tgi_batch_next_size", "Sequences in each engine step", BATCH)
        self.batch_inference = h("tgi_batch_inference_duration", "Engine step time (s)", labels=("method",))
        self.batch_forward = h("tgi_batch_forward_duration", "Engine step time (s)", labels=("method",))
        self.batch_decode = h("tgi_batch_decode_duration", "Detokenization time (s)", labels=("method",))
        self.batch_filter = h("tgi_batch_filter_duration", "Batch filtering time (s)", labels=("method",))
        g = lambda name, doc: Gauge(name, doc, registry=r)  # noqa: E731
        self.batch_size = g("tgi_batch_current_size", "Sequences running")
        self.batch_max_tokens = g("tgi_batch_current_max_tokens", "KV-cache tokens held by running sequences")
        self.queue_size = g("tgi_queue_size", "Requests waiting")
        self.kv_used = g("genserve_kv_blocks_used", "KV-cache blocks in use")
        self.kv_total = g("genserve_kv_blocks_total", "KV-cache blocks")
        self.running = g("genserve_requests_running", "Sequences being decoded")
        self.waiting = g("genserve_requests_waiting", "Sequences waiting for blocks or a prefill")
        self.in_flight = g("genserve_requests_in_flight", "HTTP generation requests being served")
        self.hit_rate = g("genserve_prefix_cache_hit_rate", "Share of prompt tokens served from the prefix cache")

    # -- engine ---------------------------------------------------------------------------
    def on_step(self, stats: dict) -> None:
        """Listener for ``AsyncEngine.step_listeners`` (runs in the engine thread)."""
        if not stats:
            return
        method = "prefill" if stats.get("is_prefill") else "decode"
        self.counters.inc("tgi_batch_inference_count", method=method)
        self.counters.inc("tgi_batch_inference_success", method=method)
        duration = stats.get("duration", 0.0)
        self.batch_inference.labels(method=method).observe(duration)
        self.batch_forward.labels(method=method).observe(duration)
        self.batch_next_size.observe(stats.get("num_seqs", 0))

    def render(self, engine_stats: dict | None, block_size: int, in_flight: int) -> bytes:
        extra = {}
        if engine_stats:
            self.kv_used.set(engine_stats["kv_blocks_used"])
            self.kv_total.set(engine_stats["kv_blocks_total"])
            self.running.set(engine_stats["running"])
            self.waiting.set(engine_stats["waiting"])
            self.batch_size.set(engine_stats["running"])
            self.queue_size.set(engine_stats["waiting"])
            self.batch_max_tokens.set(engine_stats["kv_blocks_used"] * block_size)
            self.hit_rate.set(engine_stats["prefix_cache_hit_rate"])
            extra["genserve_preemptions"] = engine_stats["preemptions"]
            extra["genserve_spec_proposed_tokens"] = engine_stats.get("spec_proposed_tokens", 0)
            extra["genserve_spec_accepted_tokens"] = engine_stats.get("spec_accepted_tokens", 0)
        self.in_flight.set(in_flight)
        return generate_latest(self.registry) + self.counters.render(extra).encode()

    # -- requests -------------------------------------------------------------------------
    def request_received(self) -> None:
        self.counters.inc("tgi_request_count")

    def request_failed(self, error_type: str) -> None:
        self.counters.inc("tgi_request_failure", err=error_type)

    def request_succeeded(self, *, start: float, validated: float, arrival: float,
                          first_scheduled: float | None, end: float, generated: int,
                          spec_proposed: int = 0, spec_accepted: int = 0) -> None:
        """Times are ``time.monotonic()``: handler start, end of validation, engine arrival, ...
        ``spec_*``: speculative tokens proposed and accepted (TGI's skipped tokens)."""
        self.counters.inc("tgi_request_success")
        scheduled = first_scheduled if first_scheduled is not None else arrival
        inference = max(end - scheduled, 0.0)
        self.request_duration.observe(max(end - start, 0.0))
        self.validation_duration.observe(max(validated - start, 0.0))
        self.queue_duration.observe(max(scheduled - arrival, 0.0))
        self.inference_duration.observe(inference)
        self.time_per_token.observe(inference / max(generated, 1))
        self.generated_tokens.observe(generated)
        self.skipped_tokens.observe(spec_accepted)
        if spec_proposed:
            self.acceptance_rate.observe(spec_accepted / spec_proposed)
