"""genserve replicas behind Ray Serve: N engines, each with its own devices, one HTTP API.

Every replica is a Ray Serve deployment replica that builds a genserve engine from the same
``genserve serve`` flags and serves genserve's own FastAPI app (TGI's and OpenAI's routes,
streaming included) through ``serve.ingress``; Ray Serve's proxy spreads requests over the
replicas, replaces a replica that dies or fails its health check (``check_health``: the engine
stopped, e.g. a shard was lost), and scales the count with ``autoscaling_config`` (Ray Serve
scales on requests in flight per replica, ``target_ongoing_requests``: a replica's queue).

A sharded replica (``--num-shard N`` on a GPU backend) reserves its N GPUs on one node through a
placement group (one bundle of N GPUs, ``STRICT_PACK``); its shard workers are the replica's
child processes and see exactly those GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``).

Python::

    from ray import serve
    from genserve.integrations.ray_serve import build_app
    serve.run(build_app(["--model-id", "HuggingFaceTB/SmolLM2-135M-Instruct"], num_replicas=2),
              route_prefix="/")

Command line (Ray's own ``serve run``, or ``serve deploy`` with the same ``args`` in a config)::

    serve run genserve.integrations.ray_serve:app_builder \\
        genserve_args="--model-id HuggingFaceTB/SmolLM2-135M-Instruct" num_replicas=2

Needs ``pip install "genserve[ray]"``. docs/distributed.md has the multi-node recipe.
"""

from __future__ import annotations

import json
import logging
import shlex
from typing import Any

from ray import serve
from ray.serve import Application

logger = logging.getLogger(__name__)
REPLICA_HEADER = "x-genserve-replica"  # which replica answered: its Ray actor's name


def parse_flags(argv: list[str]):
    """``genserve serve``'s flags (``argv``, the command line after ``serve``) as the CLI parses
    them, with the installed backends' own flags. Raises ``SystemExit`` on a bad flag (argparse)."""
    from genserve.cli import build_parser

    args = build_parser().parse_args(["serve", *argv])
    for key in ("func", "command"):
        vars(args).pop(key, None)
    return args


@serve.ingress()
class GenserveReplica:
    """One replica: a genserve engine (built in the constructor: Ray Serve routes nothing to a
    replica before it returns) and genserve's FastAPI app around it."""

    def __init__(self, argv: list[str]):
        from genserve.server.state import ServerState

        self.state = ServerState(parse_flags(argv))
        self.state.load()  # raises on a bad model or flags: Ray Serve reports the deployment failed
        # "SERVE_REPLICA::<app>#<deployment>#<id>", the replica actor's name in namespace "serve".
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()

    def __serve_build_asgi_app__(self):
        from genserve.server.app import create_app

        app = create_app(self.state, load=False)  # the app's lifespan stops the engine on shutdown

        @app.middleware("http")
        async def tag_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = self.replica_id
            return response

        return app

    def check_health(self) -> None:
        """Ray Serve's health check (every ``health_check_period_s``): raising replaces the replica."""
        state = self.state
        if state.status != "ready":
            raise RuntimeError(f"genserve engine is {state.status}: {state.error}")
        if not state.engine.is_alive:
            raise RuntimeError(f"genserve engine stopped: {state.engine.dead or 'not running'}")


def replica_resources(args) -> dict[str, Any]:
    """The deployment options a replica's devices need: a placement group of ``--num-shard``
    GPUs on one node for a sharded GPU replica, one CPU otherwise."""
    from genserve.backends.select import select_backend
    from genserve.errors import ConfigError
    from genserve.plugins import get_plugins

    if int(getattr(args, "nnodes", 1) or 1) > 1:
        raise ConfigError("a Ray Serve replica runs on one node: --nnodes is not supported here "
                          "(replicas scale out instead)")
    backend = args.backend
    shards = int(args.num_shard or 1)
    uses_gpu = backend in ("cuda", "rocm") or (backend == "auto" and
                                              select_backend(get_plugins(), "auto").name in ("cuda", "rocm"))
    if not uses_gpu:
        return {"ray_actor_options": {"num_cpus": 1}}
    return {"ray_actor_options": {"num_cpus": 1, "num_gpus": shards},
            "placement_group_bundles": [{"CPU": 1, "GPU": shards}],
            "placement_group_strategy": "STRICT_PACK"}


def build_app(argv: list[str], *, num_replicas: int | str | None = None,
              autoscaling_config: dict | None = None, name: str = "genserve",
              **deployment_options: Any) -> Application:
    """A Ray Serve application of genserve replicas.

    ``argv``: ``genserve serve`` flags for every replica (checked here, before Ray starts any);
    ``num_replicas``: a fixed count, or "auto"; ``autoscaling_config``: Ray Serve's
    (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``, ...), passed through;
    ``deployment_options``: any other ``serve.deployment`` option (``health_check_period_s``,
    ``ray_actor_options``, ...), which win over the ones derived from the flags.
    ``max_ongoing_requests`` defaults to ``--max-concurrent-requests``, so Ray Serve queues (or
    routes elsewhere) what one replica would refuse with 429.

    Raises ``genserve.errors.ConfigError`` for flags a replica cannot run with.
    """
    args = parse_flags(list(argv))
    options: dict[str, Any] = {"name": name, "max_ongoing_requests": args.max_concurrent_requests,
                               **replica_resources(args), **deployment_options}
    if autoscaling_config is not None:
        if num_replicas not in (None, "auto"):
            raise ValueError("give num_replicas or autoscaling_config, not both")
        options["autoscaling_config"] = autoscaling_config
    elif num_replicas is not None:
        options["num_replicas"] = num_replicas
    return serve.deployment(GenserveReplica).options(**options).bind(list(argv))


def app_builder(config: dict[str, str]) -> Application:
    """``serve run genserve.integrations.ray_serve:app_builder key=value ...`` (or a Serve config
    file's ``args``): ``genserve_args`` (the flags, one string), ``num_replicas``,
    ``autoscaling_config`` (JSON) and ``name``."""
    config = dict(config)
    argv = shlex.split(config.pop("genserve_args", ""))
    autoscaling = config.pop("autoscaling_config", None)
    if isinstance(autoscaling, str):
        autoscaling = json.loads(autoscaling)
    replicas = config.pop("num_replicas", None)
    num_replicas: int | str | None = int(replicas) if replicas not in (None, "auto") else replicas
    name = config.pop("name", "genserve")
    if config:
        raise ValueError(f"unknown app_builder arguments {sorted(config)}; known: genserve_args, "
                         "num_replicas, autoscaling_config, name")
    return build_app(argv, num_replicas=num_replicas, autoscaling_config=autoscaling, name=name)
