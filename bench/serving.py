"""Serving benchmark: concurrent streaming clients over HTTP vs the engine called directly.

For each concurrency level (default 1 and 32) the same greedy requests run twice:
  - HTTP: ``genserve serve`` in a subprocess (or --url), N asyncio/httpx clients streaming
    ``/generate_stream`` (TGI's SSE), one request after another per client;
  - direct: the same engine in this process through ``AsyncEngine.generate`` (no HTTP).
Reported per level: TTFT and TPOT percentiles (p50/p90/p99), end-to-end latency, output
tokens/s, and the HTTP overhead (HTTP minus direct). Client and server share the machine.

    python bench/serving.py [--model-id DIR] [--concurrency 1,32] [--requests-per-client 2]
                            [--max-new-tokens 64] [--url http://host:port] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

TOPICS = ["a lighthouse keeper", "a robot learning to paint", "the first city on Mars", "a lost umbrella",
          "a chess tournament", "an old bakery", "a whale that sings", "a library at night",
          "a mountain rescue", "a time-travelling cat", "a jazz trio", "an abandoned train station",
          "the last dragon", "a garden on a rooftop", "a submarine crew", "a village festival"]


def conversations(n: int) -> list[list[dict]]:
    """Chat requests (rendered with the model's chat template, so the model writes real text)."""
    return [[{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}"
                                        f" (part {i // len(TOPICS) + 1})."}] for i in range(n)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(records: list[dict], wall: float) -> dict:
    ttft = [r["ttft"] for r in records]
    tpot = [r["tpot"] for r in records if r["tpot"] is not None]
    e2e = [r["e2e"] for r in records]
    tokens = sum(r["tokens"] for r in records)
    out = {"requests": len(records), "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
           "req_per_s": len(records) / wall}
    for name, vals in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (0.5, 0.9, 0.99):
            out[f"{name}_p{int(q * 100)}_ms"] = pct(vals, q) * 1000
        out[f"{name}_mean_ms"] = statistics.fmean(vals) * 1000 if vals else float("nan")
    return out


def record(start: float, stamps: list[float]) -> dict:
    n = len(stamps)
    return {"ttft": stamps[0] - start, "e2e": stamps[-1] - start, "tokens": n,
            "tpot": (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else None}


# -- HTTP -------------------------------------------------------------------------------------
async def http_level(url: str, concurrency: int, per_client: int, max_new: int) -> dict:
    records: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        todo = [(await client.post("/chat_tokenize", json={"messages": m})).json()["templated_text"]
                for m in conversations(concurrency * per_client)]

        async def one(prompt: str) -> None:
            body = {"inputs": prompt, "add_special_tokens": False, "parameters": {"max_new_tokens": max_new}}
            stamps = []
            start = time.perf_counter()
            async with client.stream("POST", "/generate_stream", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise RuntimeError(event["error"])
                        stamps.append(time.perf_counter())
            records.append(record(start, stamps))

        async def worker(k: int) -> None:
            for j in range(per_client):
                await one(todo[k * per_client + j])

        t0 = time.perf_counter()
        await asyncio.gather(*[worker(k) for k in range(concurrency)])
        return summarize(records, time.perf_counter() - t0)


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = args.port
    cmd = [sys.executable, "-m", "genserve.cli", "serve", "--hostname", "127.0.0.1", "--port", str(port),
           "--max-batch-total-tokens", str(args.kv_tokens)]
    if args.model_id:
        cmd += ["--model-id", args.model_id]
    if getattr(args, "load_format", None):
        cmd += ["--load-format", args.load_format]
    if getattr(args, "max_concurrent_requests", None):
        cmd += ["--max-concurrent-requests", str(args.max_concurrent_requests)]
    # the server's log goes to a file, shown when it fails to start (a bench run on the device
    # machine has no other way to say why)
    log = tempfile.NamedTemporaryFile(prefix="genserve-bench-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "LOG_LEVEL": "WARNING"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            with open(log.name, errors="replace") as f:
                tail = "".join(f.readlines()[-40:])
            raise SystemExit(f"server exited with {proc.returncode}; the end of its log ({log.name}):\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=30).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready")


# -- direct -----------------------------------------------------------------------------------
async def direct_level(engine, tokenizer, concurrency: int, per_client: int, max_new: int) -> dict:
    from genserve.engine.sampling_params import SamplingParams

    todo = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
            for m in conversations(concurrency * per_client)]
    records: list[dict] = []

    async def one(i: int, prompt: str) -> None:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        stamps = []
        start = time.perf_counter()
        async for out in engine.generate(f"bench-{i}-{start}", ids, SamplingParams(max_new_tokens=max_new)):
            stamps.extend(time.perf_counter() for _ in out.tokens)
        records.append(record(start, stamps))

    async def worker(k: int) -> None:
        for j in range(per_client):
            i = k * per_client + j
            await one(i, todo[i])

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(k) for k in range(concurrency)])
    return summarize(records, time.perf_counter() - t0)


def run_direct(args, levels: list[int]) -> dict:
    from genserve.args import defaults
    from genserve.engine.async_engine import AsyncEngine
    from genserve.engine.build import build_engine

    loaded = build_engine(defaults(model_id=args.model_id, max_batch_total_tokens=args.kv_tokens))
    engine = AsyncEngine(loaded.engine)
    engine.start()
    try:
        async def all_levels():
            await direct_level(engine, loaded.tokenizer, 1, 1, 4)  # warm up
            return {c: await direct_level(engine, loaded.tokenizer, c, args.requests_per_client,
                                          args.max_new_tokens) for c in levels}
        return asyncio.run(all_levels())
    finally:
        engine.shutdown()


def run_http(args, levels: list[int]) -> dict:
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        async def all_levels():
            await http_level(url, 1, 1, 4)  # warm up
            return {c: await http_level(url, c, args.requests_per_client, args.max_new_tokens) for c in levels}
        return asyncio.run(all_levels())
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)


def table(results: dict) -> str:
    keys = [("tok_per_s", "tok/s"), ("ttft_p50_ms", "TTFT p50"), ("ttft_p90_ms", "TTFT p90"),
            ("ttft_p99_ms", "TTFT p99"), ("tpot_p50_ms", "TPOT p50"), ("tpot_p90_ms", "TPOT p90"),
            ("tpot_p99_ms", "TPOT p99"), ("e2e_p50_ms", "E2E p50"), ("e2e_p99_ms", "E2E p99")]
    head = f"{'conc':>4} {'mode':<8}" + "".join(f"{label:>10}" for _, label in keys)
    lines = [head, "-" * len(head)]
    for c in sorted(results["http"]):
        rows = [("http", results["http"][c])]
        if results.get("direct"):
            d = results["direct"][c]
            rows.append(("direct", d))
            rows.append(("overhead", {k: results["http"][c][k] - d[k] for k, _ in keys}))
        for mode, r in rows:
            lines.append(f"{c:>4} {mode:<8}" + "".join(f"{r[k]:>10.1f}" for k, _ in keys))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-id", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--port", type=int, default=3917)
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--kv-tokens", type=int, default=16384, help="--max-batch-total-tokens for both modes")
    p.add_argument("--skip-direct", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="write a PNG of tok/s against concurrency here (matplotlib)")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    results = {"config": vars(args), "http": run_http(args, levels)}
    if not args.skip_direct:
        results["direct"] = run_direct(args, levels)
    print(table(results))
    print("times in ms; overhead = HTTP - direct (negative tok/s = HTTP slower)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.plot:
        plot(results, args.plot, args.model_id or "SmolLM2-135M (embedded)")


def plot(results: dict, path: str, title: str) -> None:
    """Output tok/s and TTFT p50 against concurrency, HTTP and direct."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("http", "direct"):
        res = results.get(mode)
        if not res:
            continue
        levels = sorted(res)
        axes[0].plot(levels, [res[c]["tok_per_s"] for c in levels], "-o", label=mode)
        axes[1].plot(levels, [res[c]["ttft_p50_ms"] for c in levels], "-o", label=f"{mode} p50")
        axes[1].plot(levels, [res[c]["ttft_p99_ms"] for c in levels], "--s", label=f"{mode} p99")
    axes[0].set_ylabel("output tok/s")
    axes[1].set_ylabel("TTFT (ms)")
    for ax in axes:
        ax.set_xlabel("concurrent streaming clients")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
