"""Serving under load: Poisson arrivals at several request rates, streaming, over HTTP and direct.

    python bench/load_test.py --model-id DIR [--request-rates 1,2,4,8] [--requests 200]
                              [--length-scale 1.0] [--skip-direct] [--plot out.png] [--out DIR]

The workload is the offline mix of ``bench/gpu_llama8b.py`` (ShareGPT-like log-normal prompt
and output lengths, random token ids), ``--requests`` of them, scaled by ``--length-scale``
(small models on a CPU). For each rate, requests arrive as a Poisson process (exponential gaps,
seeded: every rate and mode sees the same sequence of requests, only the gaps scale):
- HTTP: ``genserve serve`` in a subprocess (or ``--url``), each request a streaming OpenAI
  ``/v1/completions`` call with the token ids as ``prompt``, one SSE event per token (a
  checkpoint directory without tokenizer gets a synthetic word-level one: ``ensure_tokenizer``);
- direct: the same engine in this process through ``AsyncEngine.generate`` (no HTTP), so
  the HTTP layer's cost is the difference.
Per rate: achieved request and token throughput, TTFT, time per output token and end-to-end
latency at p50/p90/p99; then the highest rate whose p99 TTFT stays under ``--ttft-slo`` (1 s).
Rows ``load_<stat>_rate<r>`` (``engine`` = genserve-http / genserve-direct) go to
``DIR/<device>.jsonl``; ``--plot`` draws TTFT and TPOT p50/p99 against the rate (matplotlib,
the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import start_server, summarize  # noqa: E402

STATS = ("req_per_s", "tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
         "e2e_p50_ms", "e2e_p99_ms", "failed")


def workload(n: int, vocab: int, scale: float, seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, max new tokens) pairs: the offline mix's lengths times ``scale``."""
    rng = random.Random(seed)
    jobs = []
    for _ in range(n):
        n_in = max(4, int(min(2000, max(4, rng.lognormvariate(4.95, 1.0))) * scale))
        n_out = max(2, int(min(1500, max(4, rng.lognormvariate(5.25, 0.8))) * scale))
        jobs.append(([rng.randrange(100, vocab - 1) for _ in range(n_in)], n_out))
    return jobs


def arrivals(n: int, rate: float, seed: int = 1) -> list[float]:
    """Arrival offsets in seconds of a Poisson process of ``rate`` requests/s."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(1.0)
        out.append(t / rate)
    return out


def stamps_record(start: float, stamps: list[float]) -> dict:
    n = len(stamps)
    if n == 0:
        raise RuntimeError("a request produced no token")
    return {"ttft": stamps[0] - start, "e2e": stamps[-1] - start, "tokens": n,
            "tpot": (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else None}


async def replay(jobs, offsets, send) -> dict:
    """Start ``send(i, prompt, n_out)`` for every job at its arrival offset; summarize."""
    records: list[dict] = []
    failures: list[str] = []

    async def at(i: int, offset: float, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        start = time.perf_counter()
        try:
            stamps = await send(i, *jobs[i])
        except RuntimeError as e:  # a refused or failed request is counted, not fatal to the run
            failures.append(str(e))
            return
        records.append(stamps_record(start, stamps))

    t0 = time.perf_counter()
    await asyncio.gather(*[at(i, off, t0) for i, off in enumerate(offsets)])
    if not records:
        raise RuntimeError(f"every request failed; first error: {failures[0]}")
    out = summarize(records, time.perf_counter() - t0)
    out["failed"] = len(failures)
    if failures:
        print(f"  {len(failures)} requests failed; first error: {failures[0]}", flush=True)
    return out


async def http_rate(url: str, jobs, offsets) -> dict:
    limits = httpx.Limits(max_connections=len(jobs) + 4, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def send(i: int, prompt: list[int], n_out: int) -> list[float]:
            body = {"model": "default", "prompt": prompt, "max_tokens": n_out, "stream": True,
                    "temperature": 0.0}
            stamps: list[float] = []
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise RuntimeError(event["error"])
                        if event.get("choices"):
                            stamps.append(time.perf_counter())
            return stamps

        return await replay(jobs, offsets, send)


async def direct_rate(engine, jobs, offsets, tag: str) -> dict:
    from genserve.engine.sampling_params import SamplingParams

    async def send(i: int, prompt: list[int], n_out: int) -> list[float]:
        stamps: list[float] = []
        async for out in engine.generate(f"load-{tag}-{i}", prompt, SamplingParams(max_new_tokens=n_out)):
            stamps.extend(time.perf_counter() for _ in out.tokens)
        return stamps

    return await replay(jobs, offsets, send)


def ensure_tokenizer(model_dir: str, vocab: int) -> None:
    """Give a tokenizer-less benchmark checkpoint (``--load-format dummy`` shapes) a synthetic
    word-level tokenizer, token ``i`` <-> the word ``t<i>``, so the server streams one non-empty
    text delta per token (with no tokenizer it can only stream empty text). Prompts stay token ids."""
    if any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer.model")):
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(model_dir)


def model_vocab(model_id: str | None) -> int:
    from genserve.args import defaults
    from genserve.loader.hf_config import load_config
    from genserve.loader.source import resolve

    return load_config(resolve(model_id), defaults(model_id=model_id)).vocab_size


def run_http(args, jobs, rates) -> dict:
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        async def go():
            await http_rate(url, jobs[:2], [0.0, 0.0])  # warm up
            return {r: await http_rate(url, jobs, arrivals(len(jobs), r)) for r in rates}
        return asyncio.run(go())
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


def run_direct(args, jobs, rates) -> dict:
    from genserve.args import defaults
    from genserve.engine.async_engine import AsyncEngine
    from genserve.engine.build import build_engine

    flags = {"load_format": args.load_format} if args.load_format else {}
    loaded = build_engine(defaults(model_id=args.model_id, max_batch_total_tokens=args.kv_tokens, **flags))
    engine = AsyncEngine(loaded.engine)
    engine.start()
    try:
        async def go():
            await direct_rate(engine, jobs[:2], [0.0, 0.0], "warm")
            return {r: await direct_rate(engine, jobs, arrivals(len(jobs), r), f"r{r}") for r in rates}
        return asyncio.run(go())
    finally:
        engine.shutdown()


def highest_rate_within(results: dict, slo_ms: float) -> float | None:
    ok = [r for r, s in results.items() if s["ttft_p99_ms"] <= slo_ms]
    return max(ok) if ok else None


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, stat in zip(axes, ("ttft", "tpot")):
        for mode, res in results.items():
            rates = sorted(res)
            for q, style in (("p50", "-o"), ("p99", "--s")):
                ax.plot(rates, [res[r][f"{stat}_{q}_ms"] for r in rates], style, label=f"{mode} {q}")
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel(f"{stat.upper()} (ms)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-id", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--url", default=None, help="load a running server instead of starting one")
    p.add_argument("--port", type=int, default=3919)
    p.add_argument("--request-rates", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--length-scale", type=float, default=1.0)
    p.add_argument("--kv-tokens", type=int, default=65536, help="--max-batch-total-tokens for both modes")
    p.add_argument("--ttft-slo", type=float, default=1000.0, help="ms")
    p.add_argument("--max-concurrent-requests", type=int, default=100000,
                   help="the server's queue limit (TGI's default 128 refuses requests under load: "
                        "this bench measures latency with every request queued, as vLLM's serving bench does)")
    p.add_argument("--skip-direct", action="store_true")
    p.add_argument("--load-format", default=None, help="e.g. dummy: random weights of the checkpoint's shape")
    p.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    p.add_argument("--out", default=None, help="append jsonl rows to DIR/<device>.jsonl")
    p.add_argument("--device-name", default=None, help="row label (default: the GPU's name, or cpu)")
    args = p.parse_args()
    rates = [float(r) for r in args.request_rates.split(",")]
    vocab = model_vocab(args.model_id)
    if args.model_id and os.path.isdir(args.model_id) and not args.url:
        ensure_tokenizer(args.model_id, vocab)
    jobs = workload(args.requests, vocab, args.length_scale)
    results = {"http": run_http(args, jobs, rates)}
    if not args.skip_direct:
        results["direct"] = run_direct(args, jobs, rates)

    head = f"{'rate':>6} {'mode':<7}" + "".join(f"{s:>13}" for s in STATS)
    print(head + "\n" + "-" * len(head))
    for r in rates:
        for mode, res in results.items():
            print(f"{r:>6g} {mode:<7}" + "".join(f"{res[r][s]:>13.1f}" for s in STATS))
    for mode, res in results.items():
        best = highest_rate_within(res, args.ttft_slo)
        print(f"{mode}: highest rate with p99 TTFT <= {args.ttft_slo:g} ms: {best} req/s")
    if args.out:
        import torch

        device = args.device_name or (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
        meta = {"gpu": device, "commit": os.environ.get("GENSERVE_COMMIT", "unknown"),
                "date": time.strftime("%Y-%m-%d"), "requests": args.requests,
                "length_scale": args.length_scale, "model": args.model_id or "embedded SmolLM2-135M"}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, device.replace(" ", "_") + ".jsonl"), "a") as f:
            for mode, res in results.items():
                for r in rates:
                    for s in STATS:
                        unit = "ms" if s.endswith("_ms") else s.replace("_per_", "/")
                        f.write(json.dumps({"metric": f"load_{s}_rate{r:g}", "value": round(res[r][s], 3),
                                            "unit": unit, "engine": f"genserve-{mode}", **meta}) + "\n")
                best = highest_rate_within(res, args.ttft_slo)
                f.write(json.dumps({"metric": "load_max_rate_p99_ttft_1s", "value": best, "unit": "req/s",
                                    "engine": f"genserve-{mode}", **meta}) + "\n")
    if args.plot:
        plot(results, args.plot, f"{args.model_id or 'SmolLM2-135M'}: {args.requests} requests, "
                                 f"lengths x{args.length_scale:g}")


if __name__ == "__main__":
    main()
