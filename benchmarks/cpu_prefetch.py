"""How much faster a one-token expert call runs when some of its experts were read just before.

In a decode step the CPU threads wait while the GPU runs a layer's attention and router (~60 us
a layer on the H200 machine). If they spent that wait reading the experts the next layer will
probably pick, those experts' bytes would come out of the caches when the call comes. This
measures what that would buy, before any prediction exists: per expert count K and number of
experts read ahead (0..K), one-token calls over fresh random ids, cycling over layers that
overflow the last-level cache, each call preceded by a plain parallel read of its first ``hot``
experts (the read timed on its own: in a decode step it would hide under the GPU's work) and a
short spin. Ratios are against the call with nothing read ahead, in the same rounds.

    python benchmarks/cpu_prefetch.py [--shape qwen3] [--experts 6 8] [--threads 15]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np
from common import cpu_count, cpu_model, format_table, machine_name, write_json
from cpu_items import SHAPES, expert_arrays, parallel_read, spin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cpu_kernels as ck  # noqa: E402
from cpu_kernels.probe import llc_bytes, random_layer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3", choices=sorted(SHAPES))
    ap.add_argument("--experts", type=int, nargs="*", default=[6, 8], help="experts a call reads")
    ap.add_argument("--fmt", default="int4", choices=["int4", "int8"])
    ap.add_argument("--threads", type=int, default=max(1, numba.config.NUMBA_NUM_THREADS - 1))
    ap.add_argument("--calls", type=int, default=60, help="calls per setting per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--gap-us", type=float, default=10.0, help="spin between the read and the call")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    E, H, I = SHAPES[args.shape]  # noqa: E741
    one = random_layer(args.fmt, 1, H, I, 0).expert_nbytes()
    layers = [
        random_layer(args.fmt, E, H, I, 11 * i) for i in range(max(2, -(-4 * llc_bytes() // (one * E))))
    ]
    x = rng.standard_normal((1, H)).astype(np.float32)
    out = np.empty_like(x)
    sink = np.zeros(args.threads, np.uint64)
    rows = []
    for K in args.experts:
        w = np.full((1, K), 1.0 / K, np.float32)
        hots = sorted({0, 1, 2, 3, K // 2, K})
        wall = {h: [] for h in hots}
        read = {h: [] for h in hots}
        n = 0
        for rnd in range(args.rounds):
            for hot in hots if rnd % 2 == 0 else hots[::-1]:
                for _ in range(args.calls):
                    layer = layers[n % len(layers)]
                    n += 1
                    ids = rng.choice(E, K, replace=False).astype(np.int32)
                    if hot:
                        chunks = numba.typed.List([a for e in ids[:hot] for a in expert_arrays(layer, e)])
                        t = time.perf_counter()
                        parallel_read(chunks, args.threads, sink)
                        read[hot].append(time.perf_counter() - t)
                    spin(args.gap_us * 1e-6)
                    t = time.perf_counter()
                    ck.fused_moe(x, ids[None], w, layer, out=out, threads=args.threads)
                    wall[hot].append(time.perf_counter() - t)
        base = float(np.median(wall[0])) * 1e6
        for hot in hots:
            call = float(np.median(wall[hot])) * 1e6
            rd = float(np.median(read[hot])) * 1e6 if hot else 0.0
            rows.append(
                {
                    "shape": args.shape,
                    "K": K,
                    "read_ahead": hot,
                    "read_us": round(rd, 1),
                    "call_us": round(call, 1),
                    "call_over_cold": round(call / base, 3),
                    "saved_us": round(base - call, 1),
                    "saved_per_expert_us": round((base - call) / hot, 1) if hot else 0.0,
                    "cold_expert_us": round(base / K, 1),
                }
            )
    data = {
        "machine": machine_name(),
        "cpu": cpu_model(),
        "cpus": cpu_count(),
        "llc_bytes": llc_bytes(),
        "threads": args.threads,
        "fmt": args.fmt,
        "expert_bytes": one,
        "gap_us": args.gap_us,
        "rows": rows,
        "note": "medians; call = one-token fused_moe after a parallel read of its first read_ahead experts",
    }
    path = write_json(
        f"cpu_prefetch-{args.shape}-{args.fmt}" + (f"-{args.tag}" if args.tag else ""), data, args.out
    )
    print(f"wrote {path}")
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
