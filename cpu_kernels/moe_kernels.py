"""The Numba kernels behind ``cpu_kernels.fused_moe`` (``moe.py``, which checks inputs and holds scratch):
out[t] = sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)).

T = tokens, K = experts per token, E = local experts, H = hidden, I = intermediate,
P = (token, expert) pairs kept (ids >= 0), A = experts with at least one pair,
Hp / Ip = H / I padded to 128.

One Numba entry point per format, compiled nogil so the caller's other Python threads
keep running for the whole call. Inside it, two parallel regions (three for long prefills):
  1. activations are quantized to int8 per block of 64 (int8 / int4 weights), serially for a
     few tokens, else in parallel (a one-region decode step: inside its region, below);
  2. gate+up: work items are (expert, block of I rows); each weight row is used for every
     token of that expert while it sits in L1, token blocks keep activations in L2 (prefill);
     quantized weights: an item's rows are whole blocks of 64, so it also quantizes the
     intermediate h it wrote (like the input), with no region of its own;
  3. down and the weighted sum: work items are blocks of H rows over all active experts, so
     each item owns its output rows and adds every pair's contribution directly.
Pairs are grouped by expert first (counting sort), so each expert's weights are read once.

A quantized decode step (up to ``moe.ONE_REGION_PAIRS`` pairs; the wrapper then passes per-pair
outputs) runs 1, 2 and 3 in one region, started before its inputs are ready (a GPU still making
them): every thread waits for them, groups the few pairs itself and quantizes a share of the
input blocks, so neither the threads' start nor a serial preparation (14 and 30 us of a Qwen3
layer's call in a decode step on a 16-core Xeon) follows the inputs' arrival. Each thread then
claims gate/up items until none is left, then
down items (active expert, block of H rows), each waiting for its expert's gate/up items only
(per-expert completion counters). An item writes its
pairs' weighted rows to per-pair outputs [P, H]; the last item of a block of H rows to finish
sums them into out (in expert order, as region 3 adds them: the same numbers). A V2-Lite layer
at T = 1 has ~0.3 ms of work on 16 cores: one region launch and barrier instead of two, and
6 x 32 down items instead of 32, so a slow item no longer leaves most threads idle.

Expert deferral (one region only): each token's ``defer`` lightest pairs are grouped as experts
E..2E-1 and their items come after all the others, summed into a second output. The region
sets a flag (page-locked memory a GPU polls) as soon as the first output is whole, so the GPU
goes on with the next layer while the late pairs are still being computed here.

Regions hand out work items through an atomic counter instead of a static split:
a thread that the OS deschedules (e.g. the core shared with the caller's GPU-launch
thread) delays only the item it holds, and the others take the rest.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from .dot_ir import (
    bits_to_f32,
    cycles,
    dot_bf16,
    dot_q4_rows,
    dot_q8_rows,
    f32_bits,
    fetch_add,
    set_flag,
    wait_at_least,
    wait_flag,
)  # fmt: skip

QBLK = 64  # activation quantization block, one 512-bit vector of int8
SERIAL_BLOCKS = 256  # input blocks of 64 quantized serially (no parallel region) up to this many
OK, BAD_IDS, NOT_READY = 0, 1, 2  # what a kernel call returns
# Work-item sizes (``knobs``, int64 [3], from the tuned settings): about knobs[0] items per thread
# in the gate/up and down regions; gate/up items of at least knobs[1] rows (a multiple of 64);
# quantized down items of at least knobs[2] H rows (one region: a multiple), so each item's four
# weight streams (one per quarter of its rows, per expert) run long enough for the prefetchers:
# with 16 threads and H = 2048, 8 items a thread alone gives 16-row items, four 4-row streams.
# knobs[POLLS]: polls of the input flag (``ready``) before a call gives up. knobs[QUANT_BLOCKS]:
# input blocks a thread claims at once in a one-region call (each claim and its completion count
# are an atomic add on a line all threads share: a Qwen3-30B-A3B input is 32 blocks).
ITEMS, GATE_UP_ROWS, DOWN_ROWS, POLLS, QUANT_BLOCKS = 0, 1, 2, 3, 4
DEFAULT_KNOBS = (8, 64, 64, 1 << 27, 1)
# A call's trace (``trace``, int64, cycle counts; [0]: off): TR_* slots, then TR_THREAD slots a
# thread from TR_THREADS on: its entry into the region, the end of its last gate/up item, its exit.
# Entry, inputs seen (by the first thread), region started, inputs prepared, out whole, return.
TR_ENTRY, TR_READY, TR_START, TR_PREP, TR_OUT, TR_END, TR_NTHR = 0, 1, 2, 3, 4, 5, 6
TR_THREADS, TR_THREAD = 8, 4
# One region's counters (int64, a cache line apart: index 8 c), the fixed ones first: work items
# claimed, input blocks claimed and quantized, threads that saw the inputs, failures (inputs never
# ready, bad ids), blocks of out summed; then per active expert and per block of H rows.
C_CLAIM, C_QCLAIM, C_QDONE, C_SEEN, C_NOT_READY, C_BAD_IDS, C_SUMMED, C_FIXED = 0, 1, 2, 3, 4, 5, 6, 7

# ---------------------------------------------------------------- shared pieces (serial, inlined)


@numba.njit(cache=True, nogil=True)
def wait_ready(ready, idx, polls):
    """Wait for, then clear, the input flag ready[idx] (see ``_moe_quant``): for the calls that
    read their inputs before a kernel does. Returns whether it came within ``polls`` polls."""
    if wait_flag(ready, idx, polls) == 0:
        return False
    ready[idx] = 0
    return True


@numba.njit(cache=True, nogil=True)
def late_pairs(ids, wts, defer):
    """bool [T, K]: each token's ``defer`` lowest-weight pairs among those here (ids >= 0), the
    earlier column first among equal weights; all of them when it has no more."""
    T, K = ids.shape
    late = np.zeros((T, K), np.bool_)
    for t in range(T):
        for _ in range(defer):
            best = -1
            for k in range(K):
                if ids[t, k] >= 0 and not late[t, k] and (best < 0 or wts[t, k] < wts[t, best]):
                    best = k
            if best < 0:
                break
            late[t, best] = True
    return late


@numba.njit(cache=True, nogil=True)
def _group_pairs(ids, wts, E, defer):
    """ids [T, K] int32 -> ok, start [NE + 1], slot_tok [P], slot_wt [P] float32, active [A].

    ok is False (and nothing else is meaningful) when an id lies outside -1..E-1. With defer > 0
    each token's late pairs (``late_pairs``) count as experts E..2E-1 (NE = 2E: the same weights,
    after every expert on time), else NE = E.
    """
    T, K = ids.shape
    NE = 2 * E if defer > 0 else E
    start = np.zeros(NE + 1, np.int64)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            if e < -1 or e >= E:
                return False, start, start, np.empty(0, np.float32), start
    late = late_pairs(ids, wts, defer)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            if e >= 0:
                start[e + E * late[t, k] + 1] += 1
    nact = 0
    for e in range(NE):
        if start[e + 1] > 0:
            nact += 1
        start[e + 1] += start[e]
    pos = start[:NE].copy()
    slot_tok = np.empty(start[NE], np.int64)
    slot_wt = np.empty(start[NE], np.float32)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            if e >= 0:
                e += E * late[t, k]
                s = pos[e]
                pos[e] += 1
                slot_tok[s] = t
                slot_wt[s] = wts[t, k]
    active = np.empty(nact, np.int64)
    nact = 0
    for e in range(NE):
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
    A whole block runs as straight loops that compile to vector instructions (the largest |v| as
    the largest integer of the sign-cleared bits, which order as the floats do): a decode step
    quantizes its input serially before its parallel region, ~7 us for H = 2048 as scalar code.
    The bits come from a register move (``f32_bits``), not an int32 view of v: a view is a new
    array, reference-counted at every block (on the CI machine's Zen 4, 2048 inputs took 2.2-2.6
    us on one thread against 3.5-4.4 with the view; in a region, every thread counts on the one
    shared array).
    """
    lo = b * 64
    if lo + 64 <= n:
        m = np.int32(0)
        for i in range(lo, lo + 64):
            m = max(m, f32_bits(v[i]) & np.int32(0x7FFFFFFF))
        amax = bits_to_f32(m)
        s = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
        for i in range(lo, lo + 64):
            q[i] = np.int8(min(max(np.rint(v[i] / s), np.float32(-127.0)), np.float32(127.0)))
    else:  # the last, partial block
        amax = np.float32(0.0)
        for i in range(lo, n):
            amax = max(amax, abs(v[i]))
        s = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
        for i in range(lo, lo + 64):
            qi = np.float32(0.0)
            if i < n:
                qi = min(max(np.rint(v[i] / s), np.float32(-127.0)), np.float32(127.0))
            q[i] = np.int8(qi)
    qs[b] = s
    for lane in range(16):
        i = lo + 4 * lane
        qc[16 * b + lane] = -128 * (
            np.int32(q[i]) + np.int32(q[i + 1]) + np.int32(q[i + 2]) + np.int32(q[i + 3])
        )


@numba.njit(cache=True, nogil=True, inline="always")
def _rows_per_item(rows, rb, nthr, items):
    """Rows per work item: about ``items`` items per thread, at least rb, a multiple of 8.

    Long items keep each weight stream going long enough for the hardware prefetcher (a
    fresh stream every 16 rows cost ~15% at one thread); several items per thread still let
    the others absorb a slow or descheduled one.
    """
    return max(rb, rows // (items * nthr) // 8 * 8)


@numba.njit(cache=True, nogil=True, inline="always")
def _gate_up_items(A, I, rb, nthr, knobs):  # noqa: E741
    """(rows, items per expert) of the gate/up items of A active experts: whole blocks of 64 of h."""
    rbg = -(-max(_rows_per_item(A * I, rb, nthr, knobs[ITEMS]), knobs[GATE_UP_ROWS]) // 64) * 64
    return rbg, (I + rbg - 1) // rbg


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
def _gate_up_item(
    e, we, r0, rbg, start, slot_tok, gu, gus, guz, I, xq, xs, xc, h, hq, hs, hc, gsel, rb, tb, vnni, is_int4,  # noqa: E741
    sym,
):  # fmt: skip
    """One gate/up item: rows r0..r0+rbg-1 (a multiple of 64) of expert we's weights for the pairs
    start[e]..start[e + 1]-1 (e: the expert as grouped, late pairs counting as E + we): h, and the
    blocks of 64 of h that the item wrote whole (the expert's last item: up to Ip) quantized.

    Four packed rows per dot, one from each quarter of the item's 2 * (r1 - r0) packed rows, so
    each activation vector is loaded once for four rows and the weights stream as four long
    sequential runs; the gate and up values meet in a per-item buffer before silu(gate) * up.
    """
    Hp, Ip = xq.shape[1], hq.shape[1]
    ngh, nbx, nbh64 = (Hp // 32) >> gsel, Hp // 64, Ip // 64
    r1, s0, s1 = min(r0 + rbg, I), start[e], start[e + 1]
    # one token block: the whole item in one pass, so its weights stream in long runs
    rstep = rb if s1 - s0 > tb else r1 - r0
    pre = np.empty((s1 - s0, 2 * (r1 - r0)))  # gate, up values of rows r0..r1-1, interleaved
    for c0 in range(r0, r1, rstep):  # rstep rows at a time stay in L2 across token blocks
        ce = min(c0 + rstep, r1)
        # packed rows p0.. (gate, up of each row) in four streams, one per quarter
        p0, npk = (we * I + c0) * 2, 2 * (ce - c0)
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
    part, defer, add, late_out, flag, flag_idx, ready, ready_idx, knobs, trace,
):  # fmt: skip
    """x [T, H] f32; ids [T, K] i32; wts [T, K] f32; out [T, H] f32. Returns OK, BAD_IDS or NOT_READY.

    Scales and zero points come flattened (1-D views of the packed arrays):
    int8: gu u8 [E, I, 2, Hp], gus f32 [E * I * 2], dn u8 [E, H, Ip], dns f32 [E * H].
    int4: gu u8 [E, I, 2, Hp/2], gus u16 [E * I * 2 * Hp/g], guz u8 same (or [1] when sym),
          dn u8 [E, H, Ip/2], dns u16 [E * H * Ip/g], dnz u8 same (or [1]); g = 32 << gsel.
    bufs: scratch (xq, xs, xc, h, hq, hs, hc) with at least T / P rows; nthr: the Numba thread
    count of this call. part: per-pair down outputs [>= P, >= H] f32 and ctr int64
    [8 (C_FIXED + 1 + P + 2 Hp / 64)] for one region (a decode step), else part [0, 0] and ctr int64
    [>= 16] for two regions.

    One region only (else defer 0, add / late_out [0, 0], flag [0]): each token's ``defer`` lightest
    pairs go to late_out [T, H] instead of out; add [T, H] (or [0, 0]) is added to out; once out is
    whole, flag[flag_idx] = 1 (flag [0]: no flag), and the late pairs run after that.

    ready int32 [N] (or [0]: none): the inputs x, ids, wts are whole only once ready[ready_idx] is
    set (a GPU storing them into page-locked memory sets it after them); the call waits for it and
    clears it, so that its own start (Python, the dispatch; one region: the region's too) runs
    while they are still being made; after knobs[POLLS] polls of it, it gives up.

    knobs: work-item sizes (ITEMS, GATE_UP_ROWS, DOWN_ROWS) and POLLS; trace: [0], or int64
    [>= TR_THREADS + TR_THREAD nthr] that the call fills with cycle counts (see TR_*).
    """
    tracing = trace.shape[0] > 0
    if tracing:
        trace[TR_ENTRY] = cycles()
        trace[TR_NTHR] = nthr
    if part.shape[0] > 0:
        return _one_region(
            x, ids, wts, gu, gus, guz, dn, dns, dnz, out, inter, gsel, rb, tb, vnni, is_int4, sym, bufs, ctr,
            nthr, part, defer, add, late_out, flag, flag_idx, ready, ready_idx, knobs, trace,
        )  # fmt: skip
    if ready.shape[0] > 0:
        if wait_flag(ready, ready_idx, knobs[POLLS]) == 0:
            return NOT_READY
        ready[ready_idx] = 0
    if tracing:
        trace[TR_READY] = cycles()
    I = inter  # noqa: E741
    xq, xs, xc, h, hq, hs, hc = bufs
    T, H = x.shape
    E = gu.shape[0]
    Hp = xq.shape[1]
    ok, start, slot_tok, slot_wt, active = _group_pairs(ids, wts, E, defer)
    if not ok:
        return BAD_IDS
    A = active.shape[0]
    nbx = Hp // 64
    if T * nbx <= SERIAL_BLOCKS:  # cheaper than starting a parallel region
        for item in range(T * nbx):
            t = item // nbx
            _quantize_block(x[t], H, item % nbx, xq[t], xs[t], xc[t])
    else:
        for item in prange(T * nbx):
            t = item // nbx
            _quantize_block(x[t], H, item % nbx, xq[t], xs[t], xc[t])
    if tracing:
        trace[TR_START] = trace[TR_PREP] = cycles()

    rbg, nbi = _gate_up_items(A, I, rb, nthr, knobs)
    ctr[0] = 0
    ctr[8] = 0
    for _ in prange(nthr):
        while True:
            task = fetch_add(ctr, 0, 1)
            if task >= A * nbi:
                break
            e = active[task // nbi]
            _gate_up_item(
                e, e, (task % nbi) * rbg, rbg, start, slot_tok, gu, gus, guz, I, xq, xs, xc, h, hq, hs, hc,
                gsel, rb, tb, vnni, is_int4, sym,
            )  # fmt: skip

    # at least knobs[DOWN_ROWS] rows an item: its four weight streams run a quarter of that each
    rbd = max(_rows_per_item(H, rb, nthr, knobs[ITEMS]), min(knobs[DOWN_ROWS], H))
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
    return OK


@numba.njit(cache=True, nogil=True, inline="always")
def _sum_pairs(dst, r0, r1, T, s0, s1, slot_tok, part, add):
    """dst[t, r0:r1] = the pairs s0..s1-1's rows of part summed per token (in slot order), + add."""
    for t in range(T):
        for r in range(r0, r1):
            dst[t, r] = 0.0
    for s in range(s0, s1):
        t = slot_tok[s]
        for r in range(r0, r1):
            dst[t, r] += part[s, r]
    if add.shape[0] > 0:
        for t in range(T):
            for r in range(r0, r1):
                dst[t, r] += add[t, r]


@numba.njit(cache=True, nogil=True, inline="always")  # its prange runs as the caller's parallel region
def _one_region(
    x, ids, wts, gu, gus, guz, dn, dns, dnz, out, I, gsel, rb, tb, vnni, is_int4, sym, bufs, ctr, nthr, part,  # noqa: E741
    defer, add, late_out, flag, flag_idx, ready, ready_idx, knobs, trace,
):  # fmt: skip
    """A decode step in one parallel region, started before its inputs are ready, so that the
    threads are already running when they are. Each thread waits for the input flag (if any),
    groups the pairs itself (a few, in thread-local arrays), and takes part in quantizing the
    input (blocks claimed from a counter); then work items, claimed in this order from one
    counter: gate/up items of the experts on time (each waiting for the input to be quantized),
    their down items (active expert, block of H rows), then the same two for the late pairs
    (experts E.. as grouped). A down item waits for its expert's gate/up items only (per-expert
    completion counters) and writes its pairs' weighted rows to part; the last item of a block of
    H rows to finish sums them into out (or late_out), in expert order, as two regions add them.
    The last block of out to be summed sets the flag. Returns OK, BAD_IDS or NOT_READY.

    A thread waits only for items claimed before its own, which threads that wait on nothing
    later are running: no deadlock with any number of threads, one included.
    """
    xq, xs, xc = bufs[0], bufs[1], bufs[2]  # the input's quantized blocks (the rest: _region_items)
    T, H = x.shape
    E = gu.shape[0]
    nbx = xq.shape[1] // 64
    nq = T * nbx  # input blocks to quantize
    for c in range(ctr.shape[0] // 8):  # every counter (the wrapper sizes them for this call)
        ctr[8 * c] = 0
    tracing = trace.shape[0] > 0
    if tracing:
        trace[TR_START] = cycles()
    for tid in prange(nthr):
        if tracing:
            trace[TR_THREADS + TR_THREAD * tid] = cycles()
        go = True
        if ready.shape[0] > 0 and wait_flag(ready, ready_idx, knobs[POLLS]) == 0:
            fetch_add(ctr, 8 * C_NOT_READY, 1)
            go = False
        if go:
            seen = fetch_add(ctr, 8 * C_SEEN, 1)
            if seen == 0 and tracing:
                trace[TR_READY] = cycles()
            if seen == nthr - 1 and ready.shape[0] > 0:  # the last to see the flag clears it
                ready[ready_idx] = 0
            ok, start, slot_tok, slot_wt, active = _group_pairs(ids, wts, E, defer)
            if not ok:
                fetch_add(ctr, 8 * C_BAD_IDS, 1)
                go = False
        if go:
            qb = max(knobs[QUANT_BLOCKS], 1)
            while True:  # the input's blocks, qb a claim
                q0 = fetch_add(ctr, 8 * C_QCLAIM, qb)
                if q0 >= nq:
                    break
                q1 = min(q0 + qb, nq)
                for q in range(q0, q1):
                    t = q // nbx
                    _quantize_block(x[t], H, q % nbx, xq[t], xs[t], xc[t])
                if fetch_add(ctr, 8 * C_QDONE, q1 - q0) == nq - (q1 - q0) and tracing:
                    trace[TR_PREP] = cycles()
            _region_items(
                T, H, E, I, gu, gus, guz, dn, dns, dnz, out, gsel, rb, tb, vnni, is_int4, sym, bufs, ctr,
                nthr, part, add, late_out, flag, flag_idx, start, slot_tok, slot_wt, active, knobs, trace,
                tid, nq,
            )  # fmt: skip
        if tracing:
            trace[TR_THREADS + TR_THREAD * tid + 2] = cycles()
    if ctr[8 * C_NOT_READY] > 0:
        return NOT_READY
    if ctr[8 * C_BAD_IDS] > 0:
        return BAD_IDS
    if tracing:
        trace[TR_END] = cycles()
    return OK


@numba.njit(cache=True, nogil=True)
def _region_items(
    T, H, E, I, gu, gus, guz, dn, dns, dnz, out, gsel, rb, tb, vnni, is_int4, sym, bufs, ctr, nthr, part,  # noqa: E741
    add, late_out, flag, flag_idx, start, slot_tok, slot_wt, active, knobs, trace, tid, nq,
):  # fmt: skip
    """One thread's part of ``_one_region`` once the input is grouped: work items until none is left."""
    xq, xs, xc, h, hq, hs, hc = bufs
    NE = start.shape[0] - 1
    A = active.shape[0]
    tracing = trace.shape[0] > 0
    a_now = 0
    while a_now < A and active[a_now] < E:
        a_now += 1
    a_late = A - a_now
    if tid == 0:
        if a_now == 0:  # nothing on time: out is add alone
            _sum_pairs(out, 0, H, T, 0, 0, slot_tok, part, add)
            if flag.shape[0] > 0:
                set_flag(flag, flag_idx)
        if a_late == 0 and late_out.shape[0] > 0:
            _sum_pairs(late_out, 0, H, T, 0, 0, slot_tok, part, late_out[:0])
    if A == 0:
        return
    rbg, nbi = _gate_up_items(A, I, rb, nthr, knobs)
    # about knobs[ITEMS] items per thread over all experts, whole multiples of knobs[DOWN_ROWS]
    dr = knobs[DOWN_ROWS]
    rbd = min(max(_rows_per_item(A * H, rb, nthr, knobs[ITEMS]) // dr, 1) * dr, H)
    nbh = (H + rbd - 1) // rbd
    n_now = a_now * (nbi + nbh)
    total = A * (nbi + nbh)
    # counters from C_FIXED on: C_FIXED + a gate/up items of active expert a done, C_FIXED + A + b
    # down items of row block b done (C_FIXED + A + nbh + b: late pairs)
    quantized = False
    while True:
        task = fetch_add(ctr, 8 * C_CLAIM, 1)
        if task >= total:
            break
        late = task >= n_now
        j = task - n_now if late else task
        a0, na = (a_now, a_late) if late else (0, a_now)
        if j < na * nbi:
            if not quantized:
                wait_at_least(ctr, 8 * C_QDONE, nq)
                quantized = True
            ai = a0 + j // nbi
            e = active[ai]
            _gate_up_item(
                e, e - E if late else e, (j % nbi) * rbg, rbg, start, slot_tok, gu, gus, guz, I, xq, xs,
                xc, h, hq, hs, hc, gsel, rb, tb, vnni, is_int4, sym,
            )  # fmt: skip
            fetch_add(ctr, 8 * (C_FIXED + ai), 1)
            if tracing:
                trace[TR_THREADS + TR_THREAD * tid + 1] = cycles()
            continue
        j -= na * nbi
        ai, b = a0 + j // nbh, j % nbh
        e = active[ai]
        r0, r1 = b * rbd, min(b * rbd + rbd, H)
        wait_at_least(ctr, 8 * (C_FIXED + ai), nbi)  # this expert's h
        _down_rows(
            e - E if late else e, r0, r1, start[e], start[e + 1], slot_tok, slot_wt, dn, dns, dnz, H, hq,
            hs, hc, gsel, rb, tb, vnni, is_int4, sym, part, False,
        )  # fmt: skip
        # the block's last item sums it: no wait, and the sums spread over the threads
        if fetch_add(ctr, 8 * (C_FIXED + A + b + (nbh if late else 0)), 1) == na - 1:
            if late:
                _sum_pairs(late_out, r0, r1, T, start[E], start[NE], slot_tok, part, late_out[:0])
            else:
                _sum_pairs(out, r0, r1, T, 0, start[E], slot_tok, part, add)
                if fetch_add(ctr, 8 * C_SUMMED, 1) == nbh - 1:
                    if flag.shape[0] > 0:
                        set_flag(flag, flag_idx)
                    if tracing:
                        trace[TR_OUT] = cycles()


@numba.njit(parallel=True, nogil=True, cache=True)
def _moe_bf16(x, ids, wts, gu, dn, out, I, rb, tb, xp, h, ctr, nthr):  # noqa: E741
    """x [T, H] f32; ids [T, K] i32; wts [T, K] f32; gu u16 [E, I, 2, Hp]; dn u16 [E, H, Ip]; out [T, H] f32.

    xp [>= T, Hp], h [>= P, Ip] float32 scratch (padding columns zero); ctr int64 [2]; nthr threads.
    """
    T, H = x.shape
    E, _, _, Hp = gu.shape
    Ip = dn.shape[2]
    ok, start, slot_tok, slot_wt, active = _group_pairs(ids, wts, E, 0)
    if not ok:
        return BAD_IDS
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

    rbg = min(_rows_per_item(active.shape[0] * I, rb, nthr, DEFAULT_KNOBS[ITEMS]), I)
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

    rbd = _rows_per_item(H, rb, nthr, DEFAULT_KNOBS[ITEMS])
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
    return OK
