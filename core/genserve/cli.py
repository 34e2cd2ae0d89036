"""The ``genserve`` command: ``genserve serve [TGI flags]`` and ``genserve plugins``.

``genserve --model-id ...`` (no subcommand) means ``serve``, like text-generation-launcher.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from genserve import __version__

GRACE_ENV = "GENSERVE_GRACEFUL_SHUTDOWN_TIMEOUT"  # seconds in-flight requests get on SIGTERM


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's configuration, reported as one line without a traceback."""
    from genserve.backends.select import BackendError
    from genserve.errors import ConfigError
    from genserve.layers.quantization.base import QuantizationError
    from genserve.loader.source import ModelNotFoundError
    from genserve.plugins import PluginLoadError
    from genserve.registry import UnknownEntryError
    from genserve.server.tracing import TracingError

    return (ConfigError, BackendError, ModelNotFoundError, PluginLoadError, UnknownEntryError,
            QuantizationError, TracingError)


def fail(exc: BaseException) -> int:
    if isinstance(exc, _known_errors()):
        print(f"genserve: error: {exc}", file=sys.stderr)
    else:
        import traceback

        traceback.print_exception(exc)
        print(f"genserve: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
               "level": record.levelname, "target": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(json_output: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_output else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())


# -- serve --------------------------------------------------------------------------------
def make_server(state, app, args):
    import uvicorn
    from sse_starlette.sse import AppStatus

    grace = float(os.environ.get(GRACE_ENV, "30"))

    class GracefulServer(uvicorn.Server):
        """SIGTERM/SIGINT: refuse new requests, let in-flight ones finish (up to the grace
        period), end the rest with a clean error, then stop uvicorn and the engine.
        A second signal stops at once."""

        draining = False

        async def serve(self, sockets=None):
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):
            if self.draining or state.status != "ready" or not state.in_flight:
                if self.draining and state.engine is not None:
                    state.abort_all()
                self.stop()
                return
            self.draining = state.draining = True
            logging.getLogger("genserve").info("stopping: waiting for %d request(s) (up to %.0fs)",
                                               state.in_flight, grace)
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.drain()))

        async def drain(self):
            deadline = time.monotonic() + grace
            while state.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if state.in_flight:
                state.abort_all()
                deadline = time.monotonic() + 5
                while state.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            self.stop()

        def stop(self):
            state.draining = True
            AppStatus.should_exit = True
            if self.should_exit:
                self.force_exit = True
            self.should_exit = True

    config = uvicorn.Config(app, host=args.hostname, port=args.port, log_config=None,
                            log_level=os.environ.get("LOG_LEVEL", "info").lower(),
                            access_log=os.environ.get("GENSERVE_ACCESS_LOG", "0") == "1",
                            timeout_graceful_shutdown=5, lifespan="on")
    return GracefulServer(config)


def serve(args) -> int:
    setup_logging(args.json_output)
    log = logging.getLogger("genserve")
    from genserve.backends.select import select_backend
    from genserve.executor.node import serve_shards_only
    from genserve.plugins import get_plugins
    from genserve.server.app import create_app
    from genserve.server.state import ServerState

    try:  # fail fast, before opening the port, on what needs no model
        backend_cls = select_backend(get_plugins(), args.backend)
        # A node other than 0 (--node-rank, torchrun's RANK) runs shards only, no HTTP.
        shards_only = serve_shards_only(args, backend_cls)
    except Exception as exc:
        return fail(exc)
    if shards_only is not None:
        return shards_only
    state = ServerState(args)
    holder = {}

    def on_fatal(exc):
        holder["error"] = exc
        server = holder.get("server")
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(state, on_fatal=on_fatal)
    except Exception as exc:  # e.g. --otlp-endpoint without the otel extra
        return fail(exc)
    server = holder["server"] = make_server(state, app, args)
    log.info("genserve %s: loading %s; serving on http://%s:%d (/health answers 503 until ready)",
             __version__, args.model_id or "the embedded SmolLM2-135M-Instruct", args.hostname, args.port)
    server.run()
    if "error" in holder:
        return fail(holder["error"])
    if not server.started:
        return 1
    log.info("genserve stopped")
    return 0


# -- plugins ------------------------------------------------------------------------------
def plugins(args) -> int:
    from genserve.plugins import load_plugins

    try:
        loaded = load_plugins()
    except Exception as exc:
        return fail(exc)
    if args.json:
        print(json.dumps([{"name": p.name, "module": p.module, "builtin": p.builtin, "error": p.error,
                           "registered": p.registered, "overrides": p.overrides} for p in loaded.infos],
                         indent=2))
        return 0
    for p in loaded.infos:
        origin = "built-in" if p.builtin else "installed"
        print(f"{p.name} ({p.module}, {origin})")
        if p.error:
            print(f"  FAILED to load: {p.error}")
            continue
        if not p.registered:
            print("  (registered nothing)")
        for kind, names in sorted(p.registered.items()):
            print(f"  {kind}: {', '.join(names)}")
        for kind, names in sorted(p.overrides.items()):
            print(f"  replaces built-in {kind}: {', '.join(names)}")
    failed = loaded.failed()
    if failed:
        print(f"\n{len(failed)} plugin(s) failed to load: {', '.join(p.name for p in failed)}")
    return 0


def add_backend_flags(parser: argparse.ArgumentParser) -> None:
    """Each installed backend's own flags (``Backend.options_cls``), in a group per backend."""
    from genserve.args import add_flags
    from genserve.backends.options import all_backend_flags
    from genserve.plugins import PluginLoadError, get_plugins

    try:
        backends = get_plugins().backends
    except PluginLoadError:  # `serve` reports it as one line (and --help still works)
        return
    added: set[str] = set()
    for name in sorted(backends):
        flags = [f for f in all_backend_flags([backends.get(name)]) if f.dest not in added]
        if flags:
            add_flags(parser.add_argument_group(f"backend {name}"), flags)
            added.update(f.dest for f in flags)


def build_parser() -> argparse.ArgumentParser:
    from genserve.args import add_flags

    parser = argparse.ArgumentParser(prog="genserve", description="Plugin-based LLM inference server "
                                     "with Text Generation Inference's API")
    parser.add_argument("--version", action="version", version=f"genserve {__version__}")
    sub = parser.add_subparsers(dest="command")
    p_serve = sub.add_parser("serve", help="load a model and serve TGI's and OpenAI's HTTP API")
    add_flags(p_serve)
    add_backend_flags(p_serve)
    p_serve.set_defaults(func=serve)
    p_plugins = sub.add_parser("plugins", help="list installed plugins and what they registered")
    p_plugins.add_argument("--json", action="store_true", help="machine-readable output")
    p_plugins.set_defaults(func=plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
