"""What the expert kernels reach on this machine: random packed layers, timed decode calls.

Random codes with plausible scales stand in for quantized weights (packing real floats would
take far longer than the measurement), and the calls cycle over enough layers (>= 4x the
last-level cache) with fresh random expert ids each time, so weights come from DRAM as in a
real decode step. The runtime records ``decode_bandwidth`` in the hardware profile, where the
planner prices CPU experts with it; benchmarks/cpu_experts.py reports the same measurement.
"""

from __future__ import annotations

import time
from pathlib import Path

import numba
import numpy as np
from numba import prange

from . import moe as _moe
from .dot_ir import cycles
from .formats import PackedExperts, padded
from .moe import fused_moe, set_num_threads
from .moe_kernels import TR_END, TR_ENTRY, TR_NTHR, TR_OUT, TR_PREP, TR_READY, TR_START, TR_THREAD, TR_THREADS

__all__ = [
    "cycle_hz",
    "decode_bandwidth",
    "llc_bytes",
    "random_layer",
    "time_decode",
    "topk_ids",
    "trace_medians",
    "trace_parts",
]


def llc_bytes() -> int:
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size.rstrip("K")) * 1024 if size.endswith("K") else int(size.rstrip("M")) * (1 << 20)
    except (OSError, ValueError):
        return 64 << 20


# ---------------------------------------------------------------- random packed layers


@numba.njit(parallel=True, cache=True)
def _fill(a, seed, keep, force):
    # a [n] uint64: hashed index bits, masked so values are valid for the format
    for i in prange(a.size):
        z = np.uint64(i + seed) * np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(29)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(32)
        a[i] = (z & keep) | force


def _random(shape: tuple[int, ...], dtype, seed: int, keep: int = ~0 & (2**64 - 1), force: int = 0):
    a = np.empty(shape, dtype)
    flat = a.reshape(-1).view(np.uint8)
    n8 = flat.size // 8
    _fill(flat[: n8 * 8].view(np.uint64), seed, np.uint64(keep), np.uint64(force))
    flat[n8 * 8 :] = 0
    return a


def random_layer(fmt: str, E: int, H: int, I: int, seed: int, g: int = 64) -> PackedExperts:  # noqa: E741
    """A packed layer with random codes and plausible scales, without quantizing float weights."""
    Hp, Ip = padded(H), padded(I)
    if fmt == "bf16":
        # bf16 in [2^-15, 2^-7): keep sign and mantissa, fix the exponent high bits (no NaN / denormals)
        keep, force = 0x87FF87FF87FF87FF, 0x3800380038003800
        gu = _random((E, I, 2, Hp), np.uint16, seed, keep, force)
        dn = _random((E, H, Ip), np.uint16, seed + 1, keep, force)
        z = np.zeros(1, np.uint8)
        return PackedExperts(fmt, 0, E, H, I, gu, dn, np.zeros(1, np.float32), np.zeros(1, np.float32), z, z)
    if fmt == "int8":
        gu = _random((E, I, 2, Hp), np.uint8, seed)
        dn = _random((E, H, Ip), np.uint8, seed + 1)
        z = np.full(1, 128, np.uint8)
        gus, dns = np.full((E, I, 2), 1e-3, np.float32), np.full((E, H), 1e-3, np.float32)
        return PackedExperts(fmt, 0, E, H, I, gu, dn, gus, dns, z, z)
    gu = _random((E, I, 2, Hp // 2), np.uint8, seed)
    dn = _random((E, H, Ip // 2), np.uint8, seed + 1)
    half_keep, half_force = 0x03FF03FF03FF03FF, 0x1400140014001400  # float16 scales near 1e-3
    gus = _random((E, I, 2, Hp // g), np.uint16, seed + 2, half_keep, half_force)
    dns = _random((E, H, Ip // g), np.uint16, seed + 3, half_keep, half_force)
    z = np.full(1, 8, np.uint8)
    return PackedExperts(fmt, g, E, H, I, gu, dn, gus, dns, z, z)


# ---------------------------------------------------------------- timing


def topk_ids(rng, T: int, E: int, K: int) -> np.ndarray:
    return np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)


def time_decode(layers: list[PackedExperts], T: int, K: int, min_s: float, rng) -> tuple[float, float]:
    """-> (effective weight GB/s, ms per call) over fresh ids, cycling through the layers."""
    E, H = layers[0].E, layers[0].H
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = rng.random((T, K)).astype(np.float32)
    out = np.empty((T, H), np.float32)
    fused_moe(x, topk_ids(rng, T, E, K), w, layers[0], out=out)
    nbytes, spent, n = 0, 0.0, 0
    while n < 2 * len(layers) or spent < min_s:
        layer = layers[n % len(layers)]
        ids = topk_ids(rng, T, E, K)
        t0 = time.perf_counter()
        fused_moe(x, ids, w, layer, out=out)
        spent += time.perf_counter() - t0
        nbytes += np.unique(ids).size * layer.expert_nbytes()
        n += 1
    return nbytes / spent / 1e9, spent / n * 1e3


def decode_bandwidth(
    fmt: str,
    threads: int = 0,
    tokens: int = 1,
    shape: tuple[int, int, int, int] = (32, 2048, 1408, 6),
    seconds: float = 0.5,
    max_bytes: int = 2 << 30,
    rounds: int = 3,
) -> float:
    """Bytes/s of expert weights a decode step of ``tokens`` tokens streams through ``fused_moe``
    in ``fmt`` (the unique experts it touches), with ``threads`` threads (0: the kernels' default). ``shape``: experts, hidden, intermediate,
    experts per token (default: a DeepSeek-V2-Lite layer with half its experts, which
    keeps the layers that overflow the cache small).

    The best of ``rounds`` rounds of ``seconds / rounds`` each: whatever else runs on the cores for a
    while (the end of a model's load, another process) slows a round, not the rate a plan is priced
    with. Taken in one round on the H100 machine, the int8 rate once came out ~15x under the
    kernel's own (a plan of 4.3 tokens/s for a decode then measured at 45.7)."""
    E, H, I, K = shape  # noqa: E741
    one = random_layer(fmt, 1, H, I, seed=0).expert_nbytes() * E
    n = int(min(max(2, -(-8 * llc_bytes() // one)), max(2, max_bytes // one)))
    layers = [random_layer(fmt, E, H, I, seed=7 * i) for i in range(n)]
    before = _moe._state["threads"]
    if threads:
        set_num_threads(threads)
    try:
        rng, rounds = np.random.default_rng(0), max(1, rounds)
        gbps = max(time_decode(layers, tokens, K, seconds / rounds, rng)[0] for _ in range(rounds))
    finally:
        if threads:
            set_num_threads(before)
    return gbps * 1e9


# ---------------------------------------------------------------- call traces (moe.set_trace)


@numba.njit(cache=True)
def _cycles_now():
    return cycles()


def cycle_hz(seconds: float = 0.05) -> float:
    """Rate of the cycle counter that call traces record (x86: the constant-rate time-stamp counter)."""
    _cycles_now()
    c0, t0 = _cycles_now(), time.perf_counter()
    time.sleep(seconds)
    return (_cycles_now() - c0) / (time.perf_counter() - t0)


def _thread_stamps(tr: np.ndarray) -> np.ndarray:
    """A traced call's per-thread stamps [threads, TR_THREAD]: entry, last gate/up item's end, exit."""
    n = int(tr[TR_NTHR])
    return tr[TR_THREADS : TR_THREADS + TR_THREAD * n].reshape(n, TR_THREAD)


def trace_parts(tr: np.ndarray, hz: float) -> dict[str, float] | None:
    """One traced call (a row of ``moe.set_trace``'s array) -> microseconds of its parts, or None
    for a row no one-region call filled. From the kernel's entry: its parallel region's start, the
    first and the last thread in, the inputs seen by the first thread (``ready``, or the first
    thread in without one); from then on: the inputs grouped and quantized (prep), the gate/up
    items' end, out whole; and the join after the last thread left."""
    n = int(tr[TR_NTHR])
    if n <= 0 or tr[TR_END] == 0 or tr[TR_OUT] == 0:
        return None
    us = 1e6 / hz
    th = _thread_stamps(tr)
    enter, gu_end, leave = th[:, 0], th[:, 1], th[:, 2]
    return {
        "start_us": (tr[TR_START] - tr[TR_ENTRY]) * us,
        "first_in_us": (enter.min() - tr[TR_START]) * us,
        "last_in_us": (enter.max() - tr[TR_START]) * us,
        "inputs_us": (tr[TR_READY] - tr[TR_ENTRY]) * us,
        "prep_us": (tr[TR_PREP] - tr[TR_READY]) * us,
        "gate_up_us": (gu_end.max() - tr[TR_READY]) * us,
        "out_us": (tr[TR_OUT] - tr[TR_READY]) * us,
        "join_us": (tr[TR_END] - leave.max()) * us,
        "kernel_us": (tr[TR_END] - tr[TR_ENTRY]) * us,
    }


def trace_medians(trace: np.ndarray, hz: float) -> dict[str, float]:
    """Median of each part over the traced calls (see trace_parts), and how many there were."""
    parts = [p for p in (trace_parts(r, hz) for r in trace) if p is not None]
    if not parts:
        return {"calls": 0}
    out = {k: float(np.median([p[k] for p in parts])) for k in parts[0]}
    out["calls"] = len(parts)
    return out


def trace_gaps(trace: np.ndarray, hz: float) -> dict[str, float]:
    """Between consecutive traced calls (rows in call order, as a decode step's layers make them):
    microseconds from one call's out whole to the next one's inputs seen by its first thread (the
    device's round trip: the flag seen, the result fetched, the next layer's attention and staging,
    plus any time the next call came in late), median and 90th percentile; and how many threads
    were in the next call's region before its inputs were seen (median). A step's first call after
    the one before's last counts once a step among them."""
    rows = [r for r in trace if r[TR_OUT] != 0 and r[TR_READY] != 0 and r[TR_NTHR] > 0]
    gaps = [(b[TR_READY] - a[TR_OUT]) * 1e6 / hz for a, b in zip(rows, rows[1:]) if b[TR_READY] > a[TR_OUT]]
    early = [int((_thread_stamps(r)[:, 0] < r[TR_READY]).sum()) for r in rows]
    if not gaps:
        return {}
    return {
        "gap_us": float(np.median(gaps)),
        "gap_p90_us": float(np.percentile(gaps, 90)),
        "threads_in_before_inputs": float(np.median(early)),
    }
