"""Threads that wait inside a parallel region for a flag, then read: does the way they wait matter?

A decode step's CPU call may start its parallel region before its inputs land (the GPU sets a flag
in page-locked memory), and a step run as one region would have every thread wait at every layer.
Here the region's threads spin on a flag that the main thread sets after a while, then each reads
its share of a fresh slice of a large array (as a layer's experts are read), and the cycle counter
says when each thread saw the flag and when it was done. Ways of waiting:

- ``pause``: polls with a PAUSE between them (``cpu_kernels.dot_ir.wait_flag``, what the kernels do);
  in a virtual machine a PAUSE loop may make the hypervisor take the core away (PAUSE-loop exiting);
- ``busy``: polls with no PAUSE;
- ``late``: the flag set before the region starts, so threads read as they come in (what a call
  made after its inputs landed does).

    python benchmarks/cpu_spin.py [--threads 15] [--wait-us 50 300] [--mb 12] [--reps 200]

Prints a table (medians over reps): microseconds from the flag set until the last thread saw it and
until the last was done, and the read's GB/s over the bytes from the first thread seeing the flag.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent import futures
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import format_table, machine_name, write_json  # noqa: E402

from cpu_kernels.dot_ir import cycles, set_flag, wait_at_least, wait_flag  # noqa: E402

I32 = ir.IntType(32)


@intrinsic
def _busy_wait(typingctx, arr):
    """Spin until arr[0] != 0 (int32), acquire loads, no PAUSE between them."""
    sig = types.int32(arr)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        loop = builder.append_basic_block("busy")
        done = builder.append_basic_block("busy.done")
        builder.branch(loop)
        builder.position_at_end(loop)
        v = builder.load_atomic(data, "acquire", 4)
        builder.cbranch(builder.icmp_signed("!=", v, ir.Constant(I32, 0)), done, loop)
        builder.position_at_end(done)
        return v

    return sig, codegen


@numba.njit(parallel=True, nogil=True)
def _region(flag, how, data, start, share, stamps, sums):
    """Thread t: enter, wait for flag[0] (how 0: with PAUSE, 1: without, 2: no wait), then sum its
    share of data[start:] (int64 words). stamps[t] = (enter, saw, done) cycles."""
    nthr = stamps.shape[0]
    for t in prange(nthr):
        stamps[t, 0] = cycles()
        if how == 0:
            wait_flag(flag, 0, 1 << 40)
        elif how == 1:
            _busy_wait(flag)
        stamps[t, 1] = cycles()
        acc = np.int64(0)
        lo = start + t * share
        for i in range(lo, lo + share):
            acc += data[i]
        sums[t] = acc
        stamps[t, 2] = cycles()
    return 0


@numba.njit(nogil=True)
def _wait_then_set(flag, hz, us, out, stamps, after):
    """Spin (GIL released) until every thread entered the region (stamps[t, 0] > after), then ``us``
    microseconds more, then set flag[0] (a release store); out[0] = when."""
    while True:
        entered = True
        for t in range(stamps.shape[0]):
            if wait_at_least(stamps[t], 0, after + 1) <= after:
                entered = False
        if entered:
            break
    end = cycles() + np.int64(hz * us * 1e-6)
    while cycles() < end:
        pass
    out[0] = cycles()
    set_flag(flag, 0)


@numba.njit
def _now():
    return cycles()


def _hz() -> float:
    c0, t0 = _now(), time.perf_counter()
    time.sleep(0.2)
    return (_now() - c0) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=max(1, numba.config.NUMBA_NUM_THREADS - 1))
    ap.add_argument("--wait-us", type=float, nargs="+", default=[50.0, 300.0])
    ap.add_argument("--mb", type=float, default=12.0, help="bytes read after the flag, all threads together")
    ap.add_argument("--pool-gb", type=float, default=2.0, help="the array read rotates through this much")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    numba.set_num_threads(args.threads)
    hz = _hz()
    words = int(args.pool_gb * 2**30) // 8
    data = np.ones(words, np.int64)
    share = int(args.mb * 2**20) // 8 // args.threads
    nslices = words // (share * args.threads)
    flag = np.zeros(1, np.int32)
    stamps = np.zeros((args.threads, 3), np.int64)
    sums = np.zeros(args.threads, np.int64)
    set_at = np.zeros(1, np.int64)
    pool = futures.ThreadPoolExecutor(1)  # the caller of every region, as the engine's worker
    pool.submit(_region, np.ones(1, np.int32), 2, data, 0, share, stamps, sums).result()  # compile
    _wait_then_set(np.zeros(1, np.int32), hz, 1.0, set_at, stamps, -1)

    rows, k = [], 0
    variants = [("late", 2, 0.0)] + [
        (how, code, w) for w in args.wait_us for how, code in (("pause", 0), ("busy", 1))
    ]
    results = {name + (f" {w:g}us" if code != 2 else ""): [] for name, code, w in variants}
    for rep in range(args.reps):
        for name, code, wait in variants if rep % 2 == 0 else variants[::-1]:  # alternating orders
            start = (k % nslices) * share * args.threads
            k += 1
            flag[0] = 0
            if code == 2:
                _wait_then_set(flag, hz, 0.0, set_at, stamps, -1)
                pool.submit(_region, flag, code, data, start, share, stamps, sums).result()
            else:  # one long-lived worker thread calls the region (a new one would start a new team)
                before = int(stamps[:, 0].max())
                job = pool.submit(_region, flag, code, data, start, share, stamps, sums)
                _wait_then_set(flag, hz, wait, set_at, stamps, before)
                job.result()
            us = 1e6 / hz
            saw, done = stamps[:, 1], stamps[:, 2]
            spun = (np.median(saw - stamps[:, 0]) * us) if code != 2 else 0.0
            key = name + (f" {wait:g}us" if code != 2 else "")
            results[key].append(
                (
                    (saw.max() - set_at[0]) * us,
                    (done.max() - set_at[0]) * us,
                    share * 8 * args.threads / ((done.max() - saw.min()) * us * 1e-6) / 1e9,
                    spun,
                    (stamps[:, 0].max() - stamps[:, 0].min()) * us,
                )
            )
    for key, vals in results.items():
        v = np.array(vals)
        rows.append(
            {
                "wait": key,
                "all_saw_us": round(float(np.median(v[:, 0])), 1),
                "all_done_us": round(float(np.median(v[:, 1])), 1),
                "read_GBs": round(float(np.median(v[:, 2])), 1),
                "spun_us": round(float(np.median(v[:, 3])), 1),
                "entry_spread_us": round(float(np.median(v[:, 4])), 1),
            }
        )
    out = {
        "machine": machine_name(),
        "threads": args.threads,
        "read_MB": args.mb,
        "reps": args.reps,
        "note": "medians; times from the flag set (late: the flag set before the region)",
        "rows": rows,
    }
    path = write_json("cpu_spin" + (f"-{args.tag}" if args.tag else ""), out)
    print(f"wrote {path}")
    cols = ["wait", "all_saw_us", "all_done_us", "read_GBs", "spun_us", "entry_spread_us"]
    print(format_table(rows, cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
