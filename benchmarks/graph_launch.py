"""How much of a CUDA graph the host can launch while the GPU waits on it, before the launch blocks.

A decode step launched up front (hetero.graphs, ``upfront``) is one graph whose first CPU hand-off
makes the GPU spin on a page-locked flag; the host sets that flag only after the launch returns. If
launching a graph of many kernels blocked until the GPU had worked through some of them, that step
would never finish. Here a graph of one flag wait followed by N small kernels is launched while the
flag is clear; a timer thread sets the flag HOLD seconds later. A launch that returns at once did not
block; one that returns only after HOLD blocked on the GPU. N runs up a ladder, and the same graphs
are also timed with the flag set beforehand (the host cost of launching N kernel nodes).

Run on a CUDA machine: python benchmarks/graph_launch.py [--out DIR]
Prints a table last and writes graph_launch-<gpu>.json under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from gpu_kernels.host_flag import host_flags, wait_host_flag  # noqa: E402

HOLD = 1.0  # seconds the flag stays clear after the launch starts


def graph_of(n: int, flags: torch.Tensor, x: torch.Tensor, dev: torch.device) -> torch.cuda.CUDAGraph:
    """One flag wait, then n one-element kernels (each its own graph node, in order)."""
    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):  # compiled and warmed outside the capture
        flags[0] = 1
        wait_host_flag(flags, 0, dev)
        x.add_(1)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        wait_host_flag(flags, 0, dev)
        for _ in range(n):
            x.add_(1)
    return graph


def launch_while_waiting(graph: torch.cuda.CUDAGraph, flags: torch.Tensor) -> tuple[float, float]:
    """(seconds the launch call took, seconds until the graph finished) with the flag set HOLD s late."""
    torch.cuda.synchronize()
    flags[0] = 0
    timer = threading.Timer(HOLD, lambda: flags.__setitem__(0, 1))
    t0 = time.perf_counter()
    timer.start()
    graph.replay()
    launch = time.perf_counter() - t0
    torch.cuda.synchronize()
    done = time.perf_counter() - t0
    timer.join()
    return launch, done


def launch_ready(graph: torch.cuda.CUDAGraph, flags: torch.Tensor, reps: int = 5) -> float:
    """Median seconds of the launch call when the flag is already set (nothing to wait for)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        flags[0] = 1
        t0 = time.perf_counter()
        graph.replay()
        times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--nodes", type=int, nargs="+", default=[256, 512, 1024, 1536, 2048, 3072, 4096, 8192])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dev = torch.device("cuda", 0)
    flags = host_flags(1)
    x = torch.zeros(1, device=dev)
    rows = []
    for n in args.nodes:
        graph = graph_of(n, flags, x, dev)
        launch, done = launch_while_waiting(graph, flags)
        ready = launch_ready(graph, flags)
        rows.append(
            {
                "kernel_nodes": n,
                "launch_s_while_waiting": launch,
                "blocked": launch > HOLD / 2,
                "finished_s": done,
                "launch_us_ready": ready * 1e6,
            }
        )
        print(
            f"{n:6d} nodes: launch {launch * 1e3:8.2f} ms while waiting, {ready * 1e6:7.1f} us ready",
            flush=True,
        )
        del graph
    from cpu_kernels.cpu_info import machine_name

    gpu = torch.cuda.get_device_name(dev)
    result = {
        "machine": f"{gpu} + {machine_name()}",
        "torch": torch.__version__,
        "hold_s": HOLD,
        "rows": rows,
        "first_blocked_at": next((r["kernel_nodes"] for r in rows if r["blocked"]), None),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"graph_launch-{gpu.lower().replace(' ', '-')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"\n{result['machine']} (flag held {HOLD} s)")
    print(f"{'nodes':>7} {'launch ms (waiting)':>20} {'blocked':>8} {'launch us (ready)':>18}")
    for r in rows:
        print(
            f"{r['kernel_nodes']:7d} {r['launch_s_while_waiting'] * 1e3:20.2f} {str(r['blocked']):>8}"
            f" {r['launch_us_ready']:18.1f}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
