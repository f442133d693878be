"""Where a one-token expert call's time goes, and how work-item sizes move it, side by side.

A decode step calls the CPU experts once a layer with the few experts the GPU lacks (5-6 of a
Qwen3-30B-A3B layer's 8), a few hundred microseconds each, so a call's fixed costs weigh as
much as its weight stream. Per layer shape and expert count this times one-token calls over
fresh random ids, cycling over layers that overflow the last-level cache, with the main thread
spinning ``--gap-us`` between calls as it does while the GPU computes, for each setting of the
kernels' work-item knobs (items per thread, gate/up rows and down rows a work item), in rounds
that interleave the settings. Each call's trace (``cpu_kernels.moe.set_trace``,
``cpu_kernels.probe.trace_parts``) splits it into: the Python wrapper and dispatch, the parallel
region's start (until the first and the last thread arrive), the pair grouping and input
quantization, the work until out is whole, and the join. Next to
it, a plain parallel read of the same bytes (the experts' packed arrays, split evenly over the
threads) is the ceiling at that size.

    python benchmarks/cpu_items.py [--shapes qwen3 v2-lite] [--experts 5 8] [--threads 15]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numba
import numpy as np
from common import cpu_count, cpu_model, format_table, machine_name, write_json
from numba import prange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_kernels as ck  # noqa: E402
from cpu_kernels import moe  # noqa: E402
from cpu_kernels.probe import cycle_hz, llc_bytes, random_layer, trace_parts  # noqa: E402

SHAPES = {  # E, H, I: the layer shapes of the models whose decode steps call with few experts
    "qwen3": (128, 2048, 768),
    "v2-lite": (64, 2048, 1408),
    "v3": (256, 7168, 2048),
}


@numba.njit(parallel=True, nogil=True, cache=True)
def parallel_read(chunks, nthr, sink):
    """Sum of every uint64 word of the chunks (each a 1-D view), split evenly over nthr threads."""
    total = 0
    for c in chunks:
        total += c.shape[0]
    for t in prange(nthr):
        lo, hi = total * t // nthr, total * (t + 1) // nthr
        acc = np.uint64(0)
        base = 0
        for c in chunks:
            n = c.shape[0]
            a, b = max(lo - base, 0), min(hi - base, n)
            for i in range(a, b):
                acc += c[i]
            base += n
        sink[t] = acc


def _words(a: np.ndarray) -> np.ndarray:
    flat = a.reshape(-1).view(np.uint8)
    return flat[: flat.size // 8 * 8].view(np.uint64)


def expert_arrays(layer, e: int) -> list[np.ndarray]:
    gus = layer.gate_up_scale.reshape(layer.E, -1)
    dns = layer.down_scale.reshape(layer.E, -1)
    return [_words(layer.gate_up[e]), _words(layer.down[e]), _words(gus[e]), _words(dns[e])]


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["qwen3", "v2-lite"], choices=sorted(SHAPES))
    ap.add_argument("--experts", type=int, nargs="*", default=[5, 8], help="experts a call reads")
    ap.add_argument("--fmt", default="int4", choices=["int4", "int8"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=max(1, numba.config.NUMBA_NUM_THREADS - 1))
    ap.add_argument("--calls", type=int, default=100, help="calls per setting per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap-us", type=float, default=60.0, help="main thread spinning between calls")
    ap.add_argument("--items", type=int, nargs="*", default=[8, 4, 2])
    ap.add_argument("--gate-up-rows", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--down-rows", type=int, nargs="*", default=[64, 128, 256])
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    hz = cycle_hz()
    rng = np.random.default_rng(0)
    settings = list(itertools.product(args.items, args.gate_up_rows, args.down_rows))
    rows = []
    for shape in args.shapes:
        E, H, I = SHAPES[shape]  # noqa: E741
        one = random_layer(args.fmt, 1, H, I, 0, args.group_size).expert_nbytes() * E
        layers = [
            random_layer(args.fmt, E, H, I, 11 * i, args.group_size)
            for i in range(max(2, -(-4 * llc_bytes() // one)))
        ]
        x = rng.standard_normal((1, H)).astype(np.float32)
        out = np.empty_like(x)
        sink = np.zeros(args.threads, np.uint64)
        for K in args.experts:
            w = np.full((1, K), 1.0 / K, np.float32)
            nbytes = K * layers[0].expert_nbytes()
            res = {s: {"wall": [], "read": [], "parts": []} for s in settings}
            for rnd in range(args.rounds):
                for s in settings if rnd % 2 == 0 else settings[::-1]:
                    moe.set_knobs(
                        args.fmt, H, I, decode_items_per_thread=s[0], decode_gate_up_rows=s[1],
                        decode_down_rows=s[2],
                    )  # fmt: skip
                    ck.fused_moe(x, rng.choice(E, K, replace=False).astype(np.int32)[None], w, layers[0],
                                 out=out, threads=args.threads)  # fmt: skip
                    trace = moe.set_trace(args.calls)
                    for i in range(args.calls):
                        layer = layers[(rnd * args.calls + i) % len(layers)]
                        ids = rng.choice(E, K, replace=False).astype(np.int32)
                        spin(args.gap_us * 1e-6)
                        t = time.perf_counter()
                        ck.fused_moe(x, ids[None], w, layer, out=out, threads=args.threads)
                        wall = time.perf_counter() - t
                        res[s]["wall"].append(wall)
                        parts = trace_parts(trace[i], hz)
                        parts["wrapper_us"] = wall * 1e6 - parts["kernel_us"]  # Python, dispatch
                        res[s]["parts"].append(parts)
                        other = layers[(i + 7) % len(layers)]  # not the one just read
                        chunks = numba.typed.List([a for e in ids for a in expert_arrays(other, e)])
                        spin(args.gap_us * 1e-6)
                        t = time.perf_counter()
                        parallel_read(chunks, args.threads, sink)
                        res[s]["read"].append(time.perf_counter() - t)
                    moe.set_trace(0)
            for s in settings:
                r = res[s]
                call = float(np.median(r["wall"])) * 1e6
                read = float(np.median(r["read"])) * 1e6
                row = {
                    "shape": shape,
                    "K": K,
                    "items": s[0],
                    "gu_rows": s[1],
                    "down_rows": s[2],
                    "call_us": round(call, 1),
                    "GBs": round(nbytes / call / 1e3, 1),
                    "read_us": round(read, 1),
                    "read_GBs": round(nbytes / read / 1e3, 1),
                    "over_read": round(read / call, 3),
                }
                for k in r["parts"][0]:
                    row[k] = round(float(np.median([p[k] for p in r["parts"]])), 1)
                rows.append(row)
    data = {
        "machine": machine_name(),
        "cpu": cpu_model(),
        "cpus": cpu_count(),
        "threads": args.threads,
        "fmt": args.fmt,
        "group_size": args.group_size,
        "gap_us": args.gap_us,
        "tsc_GHz": round(hz / 1e9, 3),
        "layer": numba.threading_layer(),
        "rows": rows,
        "note": "medians over rounds x calls; read = a plain parallel read of the same experts' bytes",
    }
    path = write_json("cpu_items" + (f"-{args.tag}" if args.tag else ""), data, args.out)
    print(f"wrote {path}")
    cols = ["shape", "K", "items", "gu_rows", "down_rows", "call_us", "GBs", "read_us", "over_read"]
    cols += [
        "wrapper_us",
        "first_in_us",
        "last_in_us",
        "inputs_us",
        "prep_us",
        "gate_up_us",
        "out_us",
        "join_us",
    ]
    print(format_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
