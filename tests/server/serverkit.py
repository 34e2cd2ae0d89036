"""Start ``genserve serve`` as a real subprocess and wait until /health says it is ready."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

API_KEY = "test-secret-key"
ALLOWED_ORIGIN = "https://allowed.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def genserve_command() -> list[str]:
    exe = shutil.which("genserve")
    return [exe] if exe else [sys.executable, "-m", "genserve.cli"]


class ServerProcess:
    def __init__(self, name: str, args: list[str], env: dict | None = None):
        self.name, self.args = name, list(args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tempfile.mktemp(prefix=f"genserve-{name}-", suffix=".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            genserve_command() + ["serve", "--hostname", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.started = time.monotonic()
        self.ready = False

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 240.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while not self.ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=30).status_code == 200:
                    self.ready = True
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name} not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.25)
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def sse_events(response) -> list:
    """The ``data:`` payloads of a server-sent-events response (JSON decoded, or raw text)."""
    import json

    out = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(client: httpx.Client, name: str) -> float:
    """One sample of /metrics (the first line that starts with ``name`` followed by a space)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


OVERLOADED = 'tgi_request_failure{err="overloaded"}'


def overloaded_failures(client: httpx.Client) -> float:
    """Requests refused as overloaded so far (the counter appears with the first one)."""
    return metric(client, OVERLOADED) if 'err="overloaded"' in client.get("/metrics").text else 0


def authed_async_client(server) -> httpx.AsyncClient:
    """An async client for ``server`` sending the test API key (for concurrent bursts)."""
    return httpx.AsyncClient(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})
