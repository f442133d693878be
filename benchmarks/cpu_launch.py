"""What a one-token expert call costs beyond reading its weights: parallel-region launch and scaling.

One token, one V2-Lite-shaped MoE layer (H=2048, I=1408, 6 experts from 64, int4), called back
to back as in a decode step, at several thread counts; next to it the time to start and join an
empty Numba parallel region. Cycles over enough layers that the weights come from DRAM.
Between calls the main thread can stand idle in several ways (``--gaps``), as it does in a
decode step while the GPU computes: busy in Python (``spin``), asleep (``sleep``), or, with
CUDA, replaying a graph of small kernels and waiting on its event (``cuda``: the in-turn decode
step's pattern). Run it under different NUMBA_THREADING_LAYER / OMP_WAIT_POLICY settings to
compare them.

    python benchmarks/cpu_launch.py [--tag NAME] [--threads 15 16] [--gaps spin cuda] [--ladder]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np
from common import format_table, machine_name, write_json
from numba import prange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_kernels as ck  # noqa: E402


@numba.njit(parallel=True, nogil=True)
def _empty(out, n):
    for i in prange(n):
        out[i] += 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--gap-us", type=float, default=100.0, help="idle time of the main thread between calls")
    ap.add_argument("--gaps", nargs="*", default=["spin"], choices=sorted(GAPS), help="how it stands idle")
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts (default: a ladder)")
    ap.add_argument("--fmt", default="int4", choices=["int4", "int8"])
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="import torch first and set its thread count"
    )
    ap.add_argument(
        "--ladder",
        action="store_true",
        help="also time calls of 1, 2 and 6 experts and one whose experts all lie elsewhere (ids -1): "
        "a call's fixed cost is the line's intercept",
    )
    args = ap.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
        torch.ones(1 << 20).sum()  # start torch's own thread pool, as an engine process has
    H, I, E, K = 2048, 1408, 64, 6  # noqa: E741
    rng = np.random.default_rng(0)
    g = (rng.standard_normal((E, I, H), dtype=np.float32) * 0.02).astype(np.float32)
    packed = ck.pack_experts(g, g, g.transpose(0, 2, 1).copy(), fmt=args.fmt, group_size=64)
    del g
    layers = [packed] + [
        ck.PackedExperts(**{**{f: getattr(packed, f) for f in _FIELDS}, **_copies(packed)}) for _ in range(3)
    ]
    x = rng.standard_normal((1, H), dtype=np.float32)
    w = np.full((1, K), 1.0 / K, np.float32)
    out = np.empty_like(x)
    nbytes = K * packed.expert_nbytes()
    rows = []
    top = numba.config.NUMBA_NUM_THREADS
    gaps = {name: GAPS[name](args.gap_us * 1e-6) for name in args.gaps}
    for threads in sorted(set(args.threads or (1, 2, 4, 8, max(1, top - 1), top))):
        if threads > top:
            continue
        numba.set_num_threads(threads)
        buf = np.zeros(threads)
        _empty(buf, threads)
        t = time.perf_counter()
        for _ in range(args.calls):
            _empty(buf, threads)
        empty_us = (time.perf_counter() - t) / args.calls * 1e6
        ids = [rng.choice(E, K, replace=False).astype(np.int32)[None] for _ in range(args.calls)]
        ck.fused_moe(x, ids[0], w, packed, out=out, threads=threads)
        t = time.perf_counter()
        for i in range(args.calls):
            ck.fused_moe(x, ids[i], w, layers[i % len(layers)], out=out, threads=threads)
        ms = (time.perf_counter() - t) / args.calls * 1e3
        row = {
            "threads": threads,
            "empty_region_us": round(empty_us, 1),
            "call_ms": round(ms, 3),
            "GBs": round(nbytes / ms / 1e6, 1),
        }
        for (
            name,
            idle,
        ) in gaps.items():  # as in a decode step: the main thread does something else between calls
            took = []
            for i in range(args.calls):
                idle()
                t = time.perf_counter()
                ck.fused_moe(x, ids[i], w, layers[i % len(layers)], out=out, threads=threads)
                took.append(time.perf_counter() - t)
            row[f"after_{name}_ms"] = round(sum(took) / len(took) * 1e3, 3)
            row[f"after_{name}_p90_ms"] = round(float(np.percentile(took, 90)) * 1e3, 3)
        if args.ladder:
            row.update(_ladder(x, layers, args.calls, threads, packed.expert_nbytes(), rng))
        rows.append(row)
    env = {k: os.environ.get(k, "") for k in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["torch_threads"] = str(args.torch_threads or "")
    data = {
        "machine": machine_name(),
        "fmt": args.fmt,
        "gap_us": args.gap_us,
        "layer": numba.threading_layer(),
        "env": env,
        "rows": rows,
    }
    write_json("cpu_launch" + (f"-{args.tag}" if args.tag else ""), data)
    print(f"threading layer {data['layer']}, env {env}")
    print(format_table(rows, list(rows[0])))
    return 0


def _ladder(x, layers, calls: int, threads: int, expert_bytes: int, rng) -> dict:
    """Median us of one-token calls reading 1, 2 and 6 experts and of one reading none (every id -1),
    and the straight line through the first three: us per expert (its GB/s) and the fixed cost."""
    E, out, row = layers[0].E, np.empty_like(x), {}
    for k in (0, 1, 2, 6):
        w = np.full((1, max(k, 6)), 1.0 / 6, np.float32)
        took = []
        for i in range(calls):
            ids = (
                np.full((1, 6), -1, np.int32)
                if k == 0
                else rng.choice(E, k, replace=False).astype(np.int32)[None]
            )
            t = time.perf_counter()
            ck.fused_moe(x, ids, w[:, : ids.shape[1]], layers[i % len(layers)], out=out, threads=threads)
            took.append(time.perf_counter() - t)
        row["none_us" if k == 0 else f"experts{k}_us"] = round(float(np.median(took)) * 1e6, 1)
    per, fixed = np.polyfit([1, 2, 6], [row["experts1_us"], row["experts2_us"], row["experts6_us"]], 1)
    row.update(per_expert_us=round(float(per), 1), fixed_us=round(float(fixed), 1))
    row["per_expert_GBs"] = round(expert_bytes / per / 1e3, 1)
    return row


def _spin(seconds: float):
    def idle() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    return idle


def _sleep(seconds: float):
    return lambda: time.sleep(seconds)


def _cuda(seconds: float):
    """Replay a graph of small kernels lasting about ``seconds`` on the GPU, then wait for its event."""
    import torch

    a = torch.randn(2048, device="cuda")
    done = torch.cuda.Event()
    n = 1
    while True:  # grow the graph until one replay lasts the gap
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                a.mul_(1.0001)
        graph.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        if time.perf_counter() - t >= seconds or n >= 4096:
            break
        n *= 2

    def idle() -> None:
        graph.replay()
        done.record()
        done.synchronize()

    return idle


GAPS = {"spin": _spin, "sleep": _sleep, "cuda": _cuda}


_FIELDS = ("fmt", "group_size", "E", "H", "I", "gate_up_zero", "down_zero", "symmetric")


def _copies(p) -> dict:
    return {f: np.copy(getattr(p, f)) for f in ("gate_up", "down", "gate_up_scale", "down_scale")}


if __name__ == "__main__":
    sys.exit(main())
