"""What other OpenMP teams in the process cost a parallel region's start (cpu_kernels.threads).

A decode step's CPU worker starts a Numba parallel region every layer, ~25-40 us after the last
one ended. libgomp throttles its idle workers (a short poll, then sleep in the kernel) while the
threads of all the pools it manages outnumber the CPUs, and every region then wakes them by system
calls. Here a worker thread times an empty region of its team (``--threads``, default all cores
but one, as the CPU worker's) after a busy wait of 0, 40 or 300 us, in a fresh process per setup:

- ``separate``: Numba's layer loaded with ``cpu_kernels.threads.separate_openmp`` (its own
  libgomp) or plainly (bound to torch's, imported first);
- ``other team``: none; torch's intra-op pool (a parallel torch op on every core, from the main
  thread); or a second Numba team on the main thread of every core, or of 2.

Then the case against separate runtimes (``alternating``): a model on the CPU, whose torch ops on
the main thread and the kernels' regions on the worker take turns (a 256 x 1024 by 1024 x 1024
product, then a region summing 64 rows of 20,000 floats), timed per turn with the runtime shared
or separate: each unthrottled runtime keeps its idle threads polling on the cores the other needs.

    python benchmarks/cpu_teams.py [--threads N] [--reps 600]

Prints the tables last (median us per region by gap; per turn); writes cpu_teams-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, machine_name, write_json  # noqa: E402

GAPS_US = (0, 40, 300)

# Each child: torch imported first, then Numba's layer started on its own runtime or not (argv[1]).
_PROLOGUE = r"""
import json, os, statistics, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import torch
import numba
from numba import prange
if sys.argv[1] == "yes":
    from cpu_kernels.threads import separate_openmp
    separate_openmp()
"""

_CHILD = r"""
other, threads, reps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

@numba.njit(parallel=True, nogil=True)
def region(a, n):
    for i in prange(n):
        a[i * 8] += 1.0
    return a[0]

a = np.zeros(8 * 1024)
cores = os.cpu_count()
if other == "torch":
    torch.set_num_threads(cores)
    x = torch.ones(1 << 24)
    for _ in range(5):
        x.sum()
elif other.startswith("numba"):
    n = cores if other == "numba-all" else 2
    numba.set_num_threads(n)
    region(a, n)
took = {}

def worker():
    numba.set_num_threads(threads)
    region(a, threads)
    for gap in GAPS:
        ts = []
        for _ in range(reps):
            until = time.perf_counter() + gap * 1e-6
            while time.perf_counter() < until:
                pass
            t = time.perf_counter()
            region(a, threads)
            ts.append(time.perf_counter() - t)
        took[gap] = statistics.median(ts) * 1e6

t = threading.Thread(target=worker)
t.start()
t.join()
print(json.dumps({"layer": numba.threading_layer(), "us": took}))
"""


_ALTERNATE = r"""
reps = int(sys.argv[2])

@numba.njit(parallel=True, nogil=True)
def rows(a, n):
    for i in prange(n):
        s = 0.0
        for j in range(a.shape[1]):
            s += a[i, j]
        a[i, 0] = s * 1e-9
    return a[0, 0]

a = np.random.default_rng(0).random((64, 20000))
x, w = torch.randn(256, 1024), torch.randn(1024, 1024)
worker = ThreadPoolExecutor(1)
worker.submit(rows, a, 64).result()
x @ w
took = []
for _ in range(reps):
    t = time.perf_counter()
    x @ w
    worker.submit(rows, a, 64).result()
    took.append(time.perf_counter() - t)
print(json.dumps({"us": statistics.median(took) * 1e6}))
"""


def _child(code: str, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-c", _PROLOGUE + code, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if run.returncode != 0:
        raise SystemExit(f"{args} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_case(separate: str, other: str, threads: int, reps: int) -> dict:
    got = _child(f"GAPS = {GAPS_US}\n" + _CHILD, separate, other, threads, reps)
    row = {"separate": separate, "other_team": other, "layer": got["layer"]}
    row.update({f"gap{g}_us": round(got["us"][str(g)], 1) for g in GAPS_US})
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--reps", type=int, default=600)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    rows = []
    for separate in ("no", "yes"):
        for other in ("none", "torch", "numba-all", "numba-2"):
            rows.append(run_case(separate, other, args.threads, args.reps))
            print(rows[-1], flush=True)
    turns = []
    for _ in range(2):  # twice each way, alternating
        for separate in ("no", "yes"):
            turns.append(
                {"separate": separate, "us_per_turn": round(_child(_ALTERNATE, separate, 300)["us"])}
            )
            print(turns[-1], flush=True)
    out = {
        "machine": machine_name(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "reps": args.reps,
        "note": "median us of an empty parallel region from a worker thread, after a busy wait of gap us",
        "rows": rows,
        "alternating": turns,
    }
    path = write_json("cpu_teams" + (f"-{args.tag}" if args.tag else ""), out)
    print(f"wrote {path}")
    print(format_table(turns, ["separate", "us_per_turn"]))
    print(format_table(rows, ["separate", "other_team", *[f"gap{g}_us" for g in GAPS_US]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
