"""Keeping the kernels' parallel regions quick to start: their own OpenMP runtime, and bulk work on
threads that end.

Numba's OpenMP threading layer runs a parallel region on a team of worker threads that belongs to
the thread calling it and lives as long as that thread (libgomp keeps one pool of workers per
calling thread). libgomp counts every thread of every pool it manages; while they outnumber the
CPUs it throttles them: an idle worker polls ~100 times (~1,000 under ``OMP_WAIT_POLICY=active``)
instead of ~300,000 before it sleeps in the kernel, so every later region starts by waking its
workers through system calls. A one-token decode call starts a region every layer, ~25-40 us after
the last one ended, and so pays that wake-up every layer. Measured from a worker thread
(``benchmarks/cpu_teams.py``), an empty region of 15 threads on a 16-core Xeon VM: 7-10 us
unthrottled, 33-62 us throttled; of 2 threads on a 2-core VM, 3-6 us against 14-32. In Qwen3-30B-A3B
int4 decode steps on the 16-core machine the CPU worker's threads then all came in before the
layer's inputs instead of one of 15 (``benchmarks/decode_profile.py --compare-teams``).

Two things push a decoding process over the count:
  - torch ships a libgomp of its own and loads it where every later library's symbols resolve first,
    so Numba's layer, loaded after it, runs on torch's runtime: torch's intra-op pool (one thread per
    core once any CPU op ran in parallel) counts against the kernels' team. ``separate_openmp`` loads
    Numba's layer with ``RTLD_DEEPBIND``, so that it binds to the libgomp it was linked against (the
    system's): a runtime whose pools are the CPU kernels' alone. Only for a process whose torch does
    not compute on the CPU between the kernels' calls (a model on a GPU): where torch's CPU ops and
    the kernels' regions take turns (a model on the CPU), two unthrottled runtimes each keep their
    threads polling on the cores the other needs, and one shared, throttled runtime is faster (3.2-4.3
    against 8.0 ms a turn on the 2-core VM, ``benchmarks/cpu_teams.py``'s alternating rows).
  - bulk work (a checkpoint's dequantization and packing, bandwidth probes) run on a thread other
    than the one that makes the decode calls leaves a pool of its own behind. ``on_own_thread`` runs
    such work on a thread that ends with it, and its pool with it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any


def separate_openmp() -> str | None:
    """Start Numba's threading layer, if it has not started yet, bound to an OpenMP runtime of its
    own rather than to one another library (torch) already loaded. Call it after importing torch
    and before any parallel kernel runs: a libgomp loaded after this one, with the same name,
    shares it instead. Returns the threading layer's name, or None when it had already started
    (nothing changed then)."""
    import numba
    from numba.np.ufunc import parallel

    try:
        numba.threading_layer()
        return None  # already started: its bindings are made
    except ValueError:
        pass
    deep = getattr(os, "RTLD_DEEPBIND", 0)
    flags = sys.getdlopenflags()
    if deep:
        sys.setdlopenflags(flags | deep)
    try:
        parallel._launch_threads()
    finally:
        sys.setdlopenflags(flags)
    return numba.threading_layer()


def on_own_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run on a new thread that ends when it returns, so that the team of
    workers its parallel regions start ends with it; returns its result or raises its exception.
    Meant for bulk work in a process whose decode calls run on another thread."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller)
            box["error"] = err

    # a daemon: an interrupt in the caller (Ctrl-C during a load) ends the process without waiting for it
    t = threading.Thread(target=run, name="cpu-kernels-bulk", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
