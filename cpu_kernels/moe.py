"""Fused routed-expert MoE on the CPU: out[t] = sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)).

T = tokens, K = experts per token, E = local experts, H = hidden, I = intermediate,
P = (token, expert) pairs kept (ids >= 0), A = experts with at least one pair,
Hp / Ip = H / I padded to 128.

One Numba entry point per format, compiled nogil so the caller's other Python threads
keep running for the whole call. Inside it, two parallel regions (three for long prefills):
  1. activations are quantized to int8 per block of 64 (int8 / int4 weights), serially for a
     decode step, else in parallel;
  2. gate+up: work items are (expert, block of I rows); each weight row is used for every
     token of that expert while it sits in L1, token blocks keep activations in L2 (prefill);
     quantized weights: an item's rows are whole blocks of 64, so it also quantizes the
     intermediate h it wrote (like the input), with no region of its own;
  3. down and the weighted sum: work items are blocks of H rows over all active experts, so
     each item owns its output rows and adds every pair's contribution directly.
Pairs are grouped by expert first (counting sort), so each expert's weights are read once.

A quantized decode step (up to ONE_REGION_PAIRS pairs) runs 2 and 3 in one region: each thread
takes gate/up items until none is left, then down items (active expert, block of H rows), each
waiting for its expert's gate/up items only (per-expert completion counters). An item writes its
pairs' weighted rows to per-pair outputs [P, H]; the last item of a block of H rows to finish
sums them into out (in expert order, as region 3 adds them: the same numbers). A V2-Lite layer
at T = 1 has ~0.3 ms of work on 16 cores: one region launch and barrier instead of two, and
6 x 32 down items instead of 32, so a slow item no longer leaves most threads idle.

Regions hand out work items through an atomic counter instead of a static split:
a thread that the OS deschedules (e.g. the core shared with the caller's GPU-launch
thread) delays only the item it holds, and the others take the rest.

Scratch buffers live per calling thread and per layer shape, grown on demand, so a decode
step allocates nothing but the pair grouping.

Threads: set_num_threads() fixes the count; by default a call from the main thread uses every
Numba thread and a call from any other thread leaves one core free, because that thread's
caller is busy on a core of its own (the engine's main thread launching GPU work) and a team
member sharing that core runs at half speed and is descheduled for whole time slices. On a
2-core machine with the main thread busy in torch, a V2-Lite-shaped int4 decode call took
2-5 ms with 2 threads and a steady 1.75 ms with 1.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
from numba import prange

from . import tuning
from .cpu_info import has_avx512_vnni
from .dot_ir import dot_bf16, dot_q4_rows, dot_q8_rows, fetch_add, wait_at_least
from .formats import PackedExperts

QBLK = 64  # activation quantization block, one 512-bit vector of int8
ITEMS_PER_THREAD = 8  # work items per thread in the gate/up and down regions
SERIAL_BLOCKS = 256  # input blocks of 64 quantized serially (no parallel region) up to this many
# Quantized down projection: H rows per work item at least this many (one region: a multiple),
# so each item's four weight streams (one per quarter of its rows, per expert) run 16+ rows: with
# 16 threads and H = 2048, ITEMS_PER_THREAD alone gives 16-row items, four streams of 4 rows each.
DOWN_ROWS = 64
# Quantized decode steps of up to this many (token, expert) pairs run in one parallel region, with
# per-pair down outputs [P, H] (at most 7 MB for H = 7168); larger calls are long enough that two
# regions cost little, and write no per-pair outputs.
ONE_REGION_PAIRS = 256

_state = {"threads": 0, "vnni": has_avx512_vnni()}  # threads 0: default (see module doc)


def set_num_threads(n: int) -> None:
    """Threads used by later fused_moe calls (from whichever thread calls them); 0 restores the default."""
    if not 0 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be in [0, {numba.config.NUMBA_NUM_THREADS}], got {n}")
    _state["threads"] = n


def get_num_threads() -> int:
    """Threads a call from the current thread uses."""
    if _state["threads"]:
        return _state["threads"]
    n = numba.config.NUMBA_NUM_THREADS
    if n >= 2 and threading.current_thread() is not threading.main_thread():
        return n - 1
    return n


def set_vnni(enabled: bool) -> None:
    """Use the vpdpbusd path (when the CPU has it) or the portable one; for tests and benchmarks."""
    _state["vnni"] = bool(enabled) and has_avx512_vnni()


# ---------------------------------------------------------------- shared pieces (serial, inlined)


@numba.njit(cache=True, nogil=True)
def _group_pairs(ids, wts, E):
    """ids [T, K] int32 -> ok, start [E + 1], slot_tok [P], slot_wt [P] float32, active [A].

    ok is False (and nothing else is meaningful) when an id lies outside -1..E-1.
    """
    T, K = ids.shape
    start = np.zeros(E + 1, np.int64)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            if e < -1 or e >= E:
                return False, start, start, np.empty(0, np.float32), start
            if e >= 0:
                start[e + 1] += 1
    nact = 0
    for e in range(E):
        if start[e + 1] > 0:
            nact += 1
        start[e + 1] += start[e]
    pos = start[:E].copy()
    slot_tok = np.empty(start[E], np.int64)
    slot_wt = np.empty(start[E], np.float32)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            if e >= 0:
                s = pos[e]
                pos[e] += 1
                slot_tok[s] = t
                slot_wt[s] = wts[t, k]
    active = np.empty(nact, np.int64)
    nact = 0
    for e in range(E):
        if start[e + 1] > start[e]:
            active[nact] = e
            nact += 1
    return True, start, slot_tok, slot_wt, active


@numba.njit(cache=True, nogil=True, inline="always")
def _quantize_block(v, n, b, q, qs, qc):
    """Block b (inputs 64b..64b+63) of v [>= n] float32 -> int8 codes q[64b:64b+64], scale qs[b],
    qc[16b + l] = -128 * sum of q over inputs 64b + 4l .. 64b + 4l + 3 (int32: seeds the quantized
    dots' vpdpbusd, cancelling the weight codes' offset, +128 or the int4 zero point, exactly).

    q = rint(v / s) with s = amax / 127 per block (1 for an all-zero block); inputs past n are zero.
    """
    amax = np.float32(0.0)
    for i in range(b * 64, min(b * 64 + 64, n)):
        amax = max(amax, abs(v[i]))
    s = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
    qs[b] = s
    for lane in range(16):
        four = 0
        for i in range(b * 64 + 4 * lane, b * 64 + 4 * lane + 4):
            qi = 0
            if i < n:
                qi = int(min(max(np.rint(v[i] / s), np.float32(-127.0)), np.float32(127.0)))
            q[i] = qi
            four += qi
        qc[16 * b + lane] = -128 * four


@numba.njit(cache=True, nogil=True, inline="always")
def _rows_per_item(rows, rb, nthr):
    """Rows per work item: about ITEMS_PER_THREAD items per thread, at least rb, a multiple of 8.

    Long items keep each weight stream going long enough for the hardware prefetcher (a
    fresh stream every 16 rows cost ~15% at one thread); several items per thread still let
    the others absorb a slow or descheduled one.
    """
    return max(rb, rows // (ITEMS_PER_THREAD * nthr) // 8 * 8)


@numba.njit(cache=True, nogil=True, inline="always")
def _silu_mul(g, u):
    # float64 so a float64 reference rounds h to the same float32 before quantizing it again
    return np.float32(g / (1.0 + math.exp(-g)) * u)


@numba.njit(cache=True, nogil=True, inline="always")
def _q4_rows(vnni, gsel, sym, R, w, wo, wst, a, ao, sa, sao, ac, aco, s, so, sst, z, nblk):
    """R (a literal) int4 rows, row r at w[wo + r * wst:] (scales, zero points at s, z[so + r * sst:]):
    UniTuple(float32, R). gsel 0 / 1 / 2: group size 32 / 64 / 128.
    """
    if vnni:
        if gsel == 0:
            if sym:
                return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 32, True, True)  # fmt: skip
            return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 32, False, True)  # fmt: skip
        if gsel == 1:
            if sym:
                return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 64, True, True)  # fmt: skip
            return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 64, False, True)  # fmt: skip
        if sym:
            return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 128, True, True)  # fmt: skip
        return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 128, False, True)  # fmt: skip
    if gsel == 0:
        if sym:
            return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 32, True, False)  # fmt: skip
        return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 32, False, False)  # fmt: skip
    if gsel == 1:
        if sym:
            return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 64, True, False)  # fmt: skip
        return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 64, False, False)  # fmt: skip
    if sym:
        return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 128, True, False)  # fmt: skip
    return dot_q4_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, s, so, sst, 2 * sst, z, nblk, R, 128, False, False)  # fmt: skip


@numba.njit(cache=True, nogil=True, inline="always")
def _q8_rows(vnni, R, w, wo, wst, a, ao, sa, sao, ac, aco, nblk):
    """R (a literal) int8 rows, row r at w[wo + r * wst:]: UniTuple(float32, R)."""
    if vnni:
        return dot_q8_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, nblk, R, True)
    return dot_q8_rows(w, wo, wst, 2 * wst, a, ao, sa, sao, ac, aco, nblk, R, False)


# ---------------------------------------------------------------- work items (inlined into the regions)


@numba.njit(cache=True, nogil=True, inline="always")
def _gate_up_items(
    ctr, one, nbi, rbg, active, start, slot_tok, gu, gus, guz, I, xq, xs, xc, h, hq, hs, hc, gsel, rb, tb,  # noqa: E741
    vnni, is_int4, sym,
):  # fmt: skip
    """Gate/up items claimed through ctr[0] until none is left (A * nbi); one region: each done item
    counted in ctr[8 (2 + a)] for its active expert a, after its h and hq are written (acq_rel).

    Item task: rows r0..r1-1 (rbg of them, a multiple of 64) of the active expert task // nbi for
    its pairs s0..s1-1: h, and the blocks of 64 of h that the item wrote whole (the expert's last
    item: up to Ip) quantized.

    Four packed rows per dot, one from each quarter of the item's 2 * (r1 - r0) packed rows, so
    each activation vector is loaded once for four rows and the weights stream as four long
    sequential runs; the gate and up values meet in a per-item buffer before silu(gate) * up.
    """
    Hp, Ip = xq.shape[1], hq.shape[1]
    ngh, nbx, nbh64 = (Hp // 32) >> gsel, Hp // 64, Ip // 64
    while True:
        task = fetch_add(ctr, 0, 1)
        if task >= active.shape[0] * nbi:
            break
        e = active[task // nbi]
        r0 = (task % nbi) * rbg
        r1, s0, s1 = min(r0 + rbg, I), start[e], start[e + 1]
        # one token block: the whole item in one pass, so its weights stream in long runs
        rstep = rb if s1 - s0 > tb else r1 - r0
        pre = np.empty((s1 - s0, 2 * (r1 - r0)))  # gate, up values of rows r0..r1-1, interleaved
        for c0 in range(r0, r1, rstep):  # rstep rows at a time stay in L2 across token blocks
            ce = min(c0 + rstep, r1)
            # packed rows p0.. (gate, up of each row) in four streams, one per quarter
            p0, npk = (e * I + c0) * 2, 2 * (ce - c0)
            q = npk // 4
            for tb0 in range(s0, s1, tb):
                # k < q: packed rows p0 + k + m * q (m < 4); then the npk % 4 left, each alone
                # (as four copies of itself: one call site, so one compiled copy of the dots)
                for k in range(q + npk - 4 * q):
                    kk = k if k < q else 3 * q + k
                    p, j, st = p0 + kk, 2 * (c0 - r0) + kk, q if k < q else 0  # packed row, column, stride
                    for s in range(tb0, min(tb0 + tb, s1)):
                        t = slot_tok[s]
                        if is_int4:
                            v = _q4_rows(
                                vnni, gsel, sym, 4, gu, p * (Hp // 2), st * (Hp // 2), xq, t * Hp, xs,
                                t * nbx, xc, t * (Hp // 4), gus, p * ngh, st * ngh, guz, Hp // 128,
                            )  # fmt: skip
                            for m in range(4 if k < q else 1):
                                pre[s - s0, j + m * q] = v[m]
                        else:
                            v = _q8_rows(
                                vnni, 4, gu, p * Hp, st * Hp, xq, t * Hp, xs, t * nbx, xc, t * (Hp // 4), nbx,
                            )  # fmt: skip
                            for m in range(4 if k < q else 1):
                                pre[s - s0, j + m * q] = np.float64(v[m]) * gus[p + m * q]
        for s in range(s0, s1):
            for i in range(r0, r1):
                h[s, i] = _silu_mul(pre[s - s0, 2 * (i - r0)], pre[s - s0, 2 * (i - r0) + 1])
        bend = nbh64 if r1 == I else r1 // 64
        for s in range(s0, s1):
            for b in range(r0 // 64, bend):
                _quantize_block(h[s], I, b, hq[s], hs[s], hc[s])
        if one:
            fetch_add(ctr, 8 * (2 + task // nbi), 1)


@numba.njit(cache=True, nogil=True, inline="always")
def _down_rows(
    e, r0, r1, s0, s1, slot_tok, slot_wt, dn, dns, dnz, H, hq, hs, hc, gsel, rb, tb, vnni, is_int4, sym,
    dst, by_token,
):  # fmt: skip
    """Down rows r0..r1-1 of expert e for its pairs s0..s1-1, times the routing weights:
    dst[slot_tok[s], r] += w y (by_token) or dst[s, r] = w y. Four rows per dot, one per quarter."""
    Ip = hq.shape[1]
    ngi, nbh64 = (Ip // 32) >> gsel, Ip // 64
    rstep = rb if s1 - s0 > tb else r1 - r0  # one token block: one pass, long weight streams
    for c0 in range(r0, r1, rstep):  # rstep rows at a time stay in L2 across token blocks
        ce = min(c0 + rstep, r1)
        q = (ce - c0) // 4  # rows c0 + k + m * q (m < 4) together: four sequential streams
        for tb0 in range(s0, s1, tb):
            for k in range(q + ce - c0 - 4 * q):  # as in gate/up: the rest alone, as four copies
                r = c0 + (k if k < q else 3 * q + k)
                row, st = e * H + r, q if k < q else 0
                for s in range(tb0, min(tb0 + tb, s1)):
                    if is_int4:
                        v = _q4_rows(
                            vnni, gsel, sym, 4, dn, row * (Ip // 2), st * (Ip // 2), hq, s * Ip, hs,
                            s * nbh64, hc, s * (Ip // 4), dns, row * ngi, st * ngi, dnz, Ip // 128,
                        )  # fmt: skip
                        y0, y1, y2, y3 = v[0], v[1], v[2], v[3]
                    else:
                        v = _q8_rows(
                            vnni, 4, dn, row * Ip, st * Ip, hq, s * Ip, hs, s * nbh64, hc, s * (Ip // 4), nbh64,
                        )  # fmt: skip
                        y0 = np.float32(np.float64(v[0]) * dns[row])
                        y1 = np.float32(np.float64(v[1]) * dns[row + st])
                        y2 = np.float32(np.float64(v[2]) * dns[row + 2 * st])
                        y3 = np.float32(np.float64(v[3]) * dns[row + 3 * st])
                    wt = slot_wt[s]
                    if by_token:
                        o = slot_tok[s]
                        dst[o, r] += wt * y0
                        if k < q:
                            dst[o, r + q] += wt * y1
                            dst[o, r + 2 * q] += wt * y2
                            dst[o, r + 3 * q] += wt * y3
                    else:
                        dst[s, r] = wt * y0
                        if k < q:
                            dst[s, r + q] = wt * y1
                            dst[s, r + 2 * q] = wt * y2
                            dst[s, r + 3 * q] = wt * y3


# ---------------------------------------------------------------- entry points


@numba.njit(parallel=True, nogil=True, cache=True)
def _moe_quant(
    x, ids, wts, gu, gus, guz, dn, dns, dnz, out, inter, gsel, rb, tb, vnni, is_int4, sym, bufs, ctr, nthr,
    part,
):  # fmt: skip
    """x [T, H] f32; ids [T, K] i32; wts [T, K] f32; out [T, H] f32.

    Scales and zero points come flattened (1-D views of the packed arrays):
    int8: gu u8 [E, I, 2, Hp], gus f32 [E * I * 2], dn u8 [E, H, Ip], dns f32 [E * H].
    int4: gu u8 [E, I, 2, Hp/2], gus u16 [E * I * 2 * Hp/g], guz u8 same (or [1] when sym),
          dn u8 [E, H, Ip/2], dns u16 [E * H * Ip/g], dnz u8 same (or [1]); g = 32 << gsel.
    bufs: scratch (xq, xs, xc, h, hq, hs, hc) with at least T / P rows; nthr: the Numba thread
    count of this call. part: per-pair down outputs [>= P, >= H] f32 and ctr int64 [>= 8 (3 + P + H / 64)]
    for one region (a decode step), else part [0, 0] and ctr int64 [>= 16] for two regions.
    """
    I = inter  # noqa: E741
    xq, xs, xc, h, hq, hs, hc = bufs
    T, H = x.shape
    E = gu.shape[0]
    Hp = xq.shape[1]
    ok, start, slot_tok, slot_wt, active = _group_pairs(ids, wts, E)
    if not ok:
        return False
    A = active.shape[0]
    nbx = Hp // 64
    if T * nbx <= SERIAL_BLOCKS:  # a decode step: cheaper than starting a parallel region
        for item in range(T * nbx):
            t = item // nbx
            _quantize_block(x[t], H, item % nbx, xq[t], xs[t], xc[t])
    else:
        for item in prange(T * nbx):
            t = item // nbx
            _quantize_block(x[t], H, item % nbx, xq[t], xs[t], xc[t])

    rbg = -(-_rows_per_item(A * I, rb, nthr) // 64) * 64  # whole blocks of h
    nbi = (I + rbg - 1) // rbg
    if part.shape[0] > 0:  # one region: gate/up items, then (expert, block of H rows) down items
        if A == 0:
            for t in range(T):
                for r in range(H):
                    out[t, r] = 0.0
            return True
        # about ITEMS_PER_THREAD items per thread over all experts, whole multiples of DOWN_ROWS
        rbd = min(max(_rows_per_item(A * H, rb, nthr) // DOWN_ROWS, 1) * DOWN_ROWS, H)
        nbh = (H + rbd - 1) // rbd
        ndown = A * nbh
        # counters a cache line apart: 0 gate/up claims, 8 down claims, 8 (2 + a) gate/up items
        # of active expert a done, 8 (2 + A + b) down items of row block b done
        for c in range(2 + A + nbh):
            ctr[8 * c] = 0
        for _ in prange(nthr):
            # A thread waits only after its last gate/up item is done and every item is claimed,
            # so whatever it waits for is in progress on a running thread: no deadlock with any
            # number of threads, one included.
            _gate_up_items(
                ctr, True, nbi, rbg, active, start, slot_tok, gu, gus, guz, I, xq, xs, xc, h, hq, hs, hc, gsel,
                rb, tb, vnni, is_int4, sym,
            )  # fmt: skip
            while True:
                task = fetch_add(ctr, 8, 1)
                if task >= ndown:
                    break
                ai, b = task // nbh, task % nbh
                e = active[ai]
                r0, r1 = b * rbd, min(b * rbd + rbd, H)
                wait_at_least(ctr, 8 * (2 + ai), nbi)  # this expert's h
                _down_rows(
                    e, r0, r1, start[e], start[e + 1], slot_tok, slot_wt, dn, dns, dnz, H, hq, hs, hc, gsel,
                    rb, tb, vnni, is_int4, sym, part, False,
                )  # fmt: skip
                # the block's last item sums it: no wait, and the sums spread over the threads
                if fetch_add(ctr, 8 * (2 + A + b), 1) == A - 1:
                    for t in range(T):
                        for r in range(r0, r1):
                            out[t, r] = 0.0
                    for s in range(start[E]):  # pairs in expert order, as two regions add them
                        t = slot_tok[s]
                        for r in range(r0, r1):
                            out[t, r] += part[s, r]
        return True

    ctr[0] = 0
    ctr[8] = 0
    for _ in prange(nthr):
        _gate_up_items(
            ctr, False, nbi, rbg, active, start, slot_tok, gu, gus, guz, I, xq, xs, xc, h, hq, hs, hc, gsel, rb,
            tb, vnni, is_int4, sym,
        )  # fmt: skip

    rbd = max(_rows_per_item(H, rb, nthr), min(DOWN_ROWS, H))  # four streams of >= DOWN_ROWS / 4 rows
    nbh = (H + rbd - 1) // rbd
    for _ in prange(nthr):
        while True:
            task = fetch_add(ctr, 8, 1)
            if task >= nbh:
                break
            r0 = task * rbd
            r1 = min(r0 + rbd, H)
            for t in range(T):
                for r in range(r0, r1):
                    out[t, r] = 0.0
            for ai in range(A):
                e = active[ai]
                _down_rows(
                    e, r0, r1, start[e], start[e + 1], slot_tok, slot_wt, dn, dns, dnz, H, hq, hs, hc, gsel,
                    rb, tb, vnni, is_int4, sym, out, True,
                )  # fmt: skip
    return True


@numba.njit(parallel=True, nogil=True, cache=True)
def _moe_bf16(x, ids, wts, gu, dn, out, I, rb, tb, xp, h, ctr, nthr):  # noqa: E741
    """x [T, H] f32; ids [T, K] i32; wts [T, K] f32; gu u16 [E, I, 2, Hp]; dn u16 [E, H, Ip]; out [T, H] f32.

    xp [>= T, Hp], h [>= P, Ip] float32 scratch (padding columns zero); ctr int64 [2]; nthr threads.
    """
    T, H = x.shape
    E, _, _, Hp = gu.shape
    Ip = dn.shape[2]
    ok, start, slot_tok, slot_wt, active = _group_pairs(ids, wts, E)
    if not ok:
        return False
    ctr[0] = 0
    ctr[1] = 0
    if T * H <= SERIAL_BLOCKS * 64:
        for t in range(T):
            for j in range(H):
                xp[t, j] = x[t, j]
    else:
        for t in prange(T):
            for j in range(H):
                xp[t, j] = x[t, j]

    rbg = min(_rows_per_item(active.shape[0] * I, rb, nthr), I)
    nbi = (I + rbg - 1) // rbg
    ntask = active.shape[0] * nbi
    for _ in prange(nthr):
        while True:
            task = fetch_add(ctr, 0, 1)
            if task >= ntask:
                break
            e = active[task // nbi]
            r0 = (task % nbi) * rbg
            r1 = min(r0 + rbg, I)
            s0, s1 = start[e], start[e + 1]
            for c0 in range(r0, r1, rb):  # rb rows at a time stay in L2 across token blocks
                for tb0 in range(s0, s1, tb):
                    for i in range(c0, min(c0 + rb, r1)):
                        row = (e * I + i) * 2
                        for s in range(tb0, min(tb0 + tb, s1)):
                            t = slot_tok[s]
                            gv = dot_bf16(gu, row * Hp, xp, t * Hp, Hp // 64)
                            uv = dot_bf16(gu, (row + 1) * Hp, xp, t * Hp, Hp // 64)
                            h[s, i] = _silu_mul(np.float64(gv), np.float64(uv))

    rbd = _rows_per_item(H, rb, nthr)
    nbh = (H + rbd - 1) // rbd
    for _ in prange(nthr):
        while True:
            task = fetch_add(ctr, 1, 1)
            if task >= nbh:
                break
            r0 = task * rbd
            r1 = min(r0 + rbd, H)
            for t in range(T):
                for r in range(r0, r1):
                    out[t, r] = 0.0
            for ai in range(active.shape[0]):
                e = active[ai]
                s0, s1 = start[e], start[e + 1]
                for c0 in range(r0, r1, rb):  # rb rows at a time stay in L2 across token blocks
                    for tb0 in range(s0, s1, tb):
                        for r in range(c0, min(c0 + rb, r1)):
                            for s in range(tb0, min(tb0 + tb, s1)):
                                y = dot_bf16(dn, (e * H + r) * Ip, h, s * Ip, Ip // 64)
                                out[slot_tok[s], r] += slot_wt[s] * y
    return True


# ---------------------------------------------------------------- scratch


_local = threading.local()
_NO_PART = np.empty((0, 0), np.float32)  # two regions: no per-pair down outputs


def _scratch(kind: str, Hp: int, Ip: int, T: int, P: int) -> tuple:
    """Per-thread scratch for one layer shape, grown to at least T token rows and P pair rows."""
    cache = getattr(_local, "bufs", None)
    if cache is None:
        cache = _local.bufs = {}
    key = (kind, Hp, Ip)
    got = cache.get(key)
    if got is not None and got[0] >= T and got[1] >= P:
        return got[2]
    T, P = max(T, 1, got[0] if got else 0), max(P, 1, got[1] if got else 0)
    if kind == "bf16":
        bufs = (np.zeros((T, Hp), np.float32), np.zeros((P, Ip), np.float32), np.zeros(2, np.int64))
    elif kind == "part":  # one region: per-pair down outputs, counters a cache line apart
        bufs = (np.empty((P, Hp), np.float32), np.zeros(8 * (3 + P + Hp // 64), np.int64))
    else:
        bufs = (
            (
                np.empty((T, Hp), np.int8), np.empty((T, Hp // 64), np.float32),
                np.empty((T, Hp // 4), np.int32), np.zeros((P, Ip), np.float32),
                np.empty((P, Ip), np.int8), np.empty((P, Ip // 64), np.float32),
                np.empty((P, Ip // 4), np.int32),
            ),
            np.zeros(16, np.int64),
        )  # fmt: skip
    if len(cache) >= 8:  # many layer shapes in one thread: drop the oldest
        cache.pop(next(iter(cache)))
    cache[key] = (T, P, bufs)
    return bufs


# ---------------------------------------------------------------- wrapper


def _bad_ids(topk_ids, E: int) -> ValueError:
    lo, hi = topk_ids.min(), topk_ids.max()
    return ValueError(f"topk_ids must be -1 (skip) or in [0, {E}), got min {lo} max {hi}")


def _check_inputs(x, topk_ids, topk_weights, experts, out) -> None:
    """Types and shapes; the ids' range is checked by the kernel's first pass over them."""
    if not isinstance(experts, PackedExperts):
        raise ValueError(f"experts must be PackedExperts (from pack_experts), got {type(experts).__name__}")
    for name, a, dt, nd in (("x", x, np.float32, 2), ("topk_ids", topk_ids, np.int32, 2)):
        if not isinstance(a, np.ndarray) or a.dtype != dt or a.ndim != nd:
            got = f"{a.dtype} with {a.ndim} dims" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name} must be a {nd}-D {np.dtype(dt).name} numpy array, got {got}")
    if not isinstance(topk_weights, np.ndarray) or topk_weights.dtype != np.float32:
        raise ValueError(
            f"topk_weights must be a float32 numpy array, got {getattr(topk_weights, 'dtype', None)}"
        )
    T, H = x.shape
    if H != experts.H:
        raise ValueError(f"x has hidden size {H}, experts were packed with H={experts.H}")
    if topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids {topk_ids.shape} and topk_weights {topk_weights.shape} must both be [T={T}, K]"
        )
    if out is not None:
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (T, H):
            raise ValueError(
                f"out must be a float32 array of shape {(T, H)}, got {getattr(out, 'shape', out)}"
            )
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")


_settings: dict = {}


def _cfg(fmt: str, H: int, I: int) -> tuple:  # noqa: E741
    key = (fmt, H, I)
    got = _settings.get(key)
    if got is None:
        c = tuning.settings(fmt, H, I)
        got = _settings[key] = (
            c["prefill_tokens_per_expert"],
            (c["decode_row_block"], c["decode_token_block"]),
            (c["prefill_row_block"], c["prefill_token_block"]),
        )
    return got


def fused_moe(
    x: np.ndarray,
    topk_ids: np.ndarray,
    topk_weights: np.ndarray,
    experts: PackedExperts,
    out: np.ndarray | None = None,
    prefer: str = "auto",
    threads: int | None = None,
) -> np.ndarray:
    """Routed experts of one layer for T tokens; returns out [T, H] float32.

    x: float32 [T, H]; topk_ids: int32 [T, K], local expert ids, -1 = not on this backend (skipped);
    topk_weights: float32 [T, K]; out: optional float32 [T, H] C-contiguous buffer written in place.
    prefer: "decode" (stream each expert's rows once, all its tokens per row), "prefill"
    (token blocks sized for L2), or "auto" (picked from tokens per expert with tuned settings).
    threads: Numba threads for this call (default: get_num_threads() of the calling thread).
    The GIL is released for the whole computation.
    """
    _check_inputs(x, topk_ids, topk_weights, experts, out)
    if prefer not in ("auto", "decode", "prefill"):
        raise ValueError(f"prefer must be 'auto', 'decode' or 'prefill', got {prefer!r}")
    ex = experts
    x = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    ids = topk_ids if topk_ids.flags.c_contiguous else np.ascontiguousarray(topk_ids)
    wts = topk_weights if topk_weights.flags.c_contiguous else np.ascontiguousarray(topk_weights)
    if out is None:
        out = np.empty_like(x)
    T, K = ids.shape
    thresh, decode, prefill = _cfg(ex.fmt, ex.H, ex.I)
    mode = prefer
    if mode == "auto":
        mode = "decode"
        if T * K >= thresh * min(ex.E, T * K):  # cheap bound first: decode steps never count pairs
            pairs = int(np.count_nonzero(ids >= 0))
            if pairs / max(1, min(ex.E, pairs)) >= thresh:
                mode = "prefill"
    rb, tb = decode if mode == "decode" else prefill
    nthr = threads or get_num_threads()
    numba.set_num_threads(nthr)  # thread-local in Numba: set by the calling thread
    if ex.fmt == "bf16":
        xp, h, ctr = _scratch("bf16", ex.Hp, ex.Ip, T, T * K)
        ok = _moe_bf16(x, ids, wts, ex.gate_up, ex.down, out, ex.I, rb, tb, xp, h, ctr, nthr)
    else:
        is4 = ex.fmt == "int4"
        gsel = (ex.group_size // 64) if is4 else 0  # 32 / 64 / 128 -> 0 / 1 / 2
        bufs, ctr = _scratch("q", ex.Hp, ex.Ip, T, T * K)
        part = _NO_PART
        if mode == "decode" and T * K <= ONE_REGION_PAIRS:
            part, ctr = _scratch("part", ex.Hp, 0, 0, T * K)
        ok = _moe_quant(
            x, ids, wts, ex.gate_up, ex.gate_up_scale.reshape(-1), ex.gate_up_zero.reshape(-1), ex.down,
            ex.down_scale.reshape(-1), ex.down_zero.reshape(-1), out, ex.I, gsel, rb, tb, _state["vnni"], is4,
            ex.symmetric, bufs, ctr, nthr, part,
        )  # fmt: skip
    if not ok:
        raise _bad_ids(ids, ex.E)
    return out
