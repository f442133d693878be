"""`hetero serve`, and a server in a background thread for tests and benchmarks."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from hetero.bench import capped_options
from hetero.checkpoint import resolve_model_path
from hetero.distributed import SINGLE, Parallel, launch
from hetero.experts import pin_streamed
from hetero.runtime import RuntimeOptions, load_runtime
from placement.units import parse_size
from server.app import ServerConfig, create_app
from server.worker import follow


def _load(model, options: RuntimeOptions, args: argparse.Namespace, parallel: Parallel = SINGLE):
    runtime = load_runtime(model, options, parallel)
    if getattr(args, "speculate", None):
        from hetero.speculative import enable_speculation

        enable_speculation(runtime, args.speculate, args.spec_k)
    # Compile the kernels and capture the decode graphs of every step size (verify steps'
    # too) before serving, not under the first requests.
    engine = runtime.engine
    pin_streamed(engine.model)  # else the first long prompt waits while RAM experts are page-locked
    engine.warm_up(range(1, options.max_batch + 1))
    if engine.graphs is not None:
        engine.graphs.prepare(engine.graphs.max_batch)
    if runtime.plan is not None and engine.device.type == "cuda":
        import torch

        print(
            f"device memory after warm-up: {torch.cuda.memory_reserved(engine.device) / 2**30:.2f} GiB "
            f"reserved by torch (peak {torch.cuda.max_memory_reserved(engine.device) / 2**30:.2f}); "
            f"the plan's {runtime.plan.gpu_bytes / 2**30:.2f} GiB: {runtime.plan.gpu_breakdown}",
            file=sys.stderr,
            flush=True,
        )
    return runtime


def serve(args: argparse.Namespace) -> int:
    """Bind (loopback unless told otherwise), load the model in the background, serve until interrupted.

    With ``--gpus N`` one process per GPU: rank 0 serves HTTP, the others follow its engine.
    """
    gpus = getattr(args, "gpus", 1)
    if gpus > 1:
        backend = "gloo" if args.device == "cpu" else None
        return launch(_serve_rank, gpus, args, backend=backend)[0]
    return _serve(args)


def _serve_rank(parallel: Parallel, args: argparse.Namespace) -> int:
    if parallel.is_first:
        return _serve(args, parallel)
    # Rank 0 handles Ctrl-C and then tells this rank to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    model = None if args.model is None else resolve_model_path(args.model)
    follow(_load(model, _options(args, parallel), args, parallel).engine, parallel)
    return 0


def _options(args: argparse.Namespace, parallel: Parallel = SINGLE) -> RuntimeOptions:
    return capped_options(
        getattr(args, "gpu_mem", None),
        parallel.rank,
        device=args.device,
        cpu_mem=parse_size(args.cpu_mem) if getattr(args, "cpu_mem", None) else None,
        experts=getattr(args, "experts", "int4"),
        max_model_len=args.max_model_len,
        max_batch=args.max_batch,
        max_step_tokens=args.max_step_tokens,
        prefix_caching=not getattr(args, "no_prefix_cache", False),
        host_kv_mem=parse_size(getattr(args, "host_kv_mem", "0") or "0"),
        cuda_graphs=not getattr(args, "eager", False),
        overlap=not getattr(args, "no_overlap", False),
        expert_freq=getattr(args, "freq", None),
    )


def _serve(args: argparse.Namespace, parallel: Parallel = SINGLE) -> int:
    # Resolve the path now, so a wrong name fails at once rather than after the server is up.
    model = None if args.model is None else resolve_model_path(args.model)
    options = _options(args, parallel)
    config = ServerConfig(model_name=args.served_model_name, api_key=args.api_key, max_queue=args.max_queue)
    app = create_app(lambda: _load(model, options, args, parallel), config)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=5))
    state = app.state.hetero
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"hetero serve: http://{host}:{args.port}/v1 (the model is loading; GET /health says when it is ready)"
    )
    server.run()
    if state.load_error:
        print(f"hetero serve: error: {state.load_error}")
        return 2
    return 0


class BackgroundServer:
    """uvicorn in a daemon thread on a free loopback port; a context manager that shuts it down."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
        self.app, self.server = app, uvicorn.Server(config)
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="hetero-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
