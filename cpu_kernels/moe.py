"""Fused routed-expert MoE on the CPU: out[t] = sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)).

T = tokens, K = experts per token, E = local experts, H = hidden, I = intermediate,
P = (token, expert) pairs kept (ids >= 0), A = experts with at least one pair,
Hp / Ip = H / I padded to 128.

One Numba entry point per format, compiled nogil so the caller's other Python threads
keep running for the whole call. Inside it:
  1. pairs are grouped by expert (counting sort), so each expert's weights are read once;
  2. activations are quantized to int8 per block of 64 (int8 / int4 weights);
  3. gate+up: parallel over (expert, block of I rows); each weight row is used for every
     token of that expert while it sits in L1, token blocks keep activations in L2 (prefill);
  4. the intermediate h is quantized like the input, then down: parallel over (expert, block of H rows);
  5. each token's outputs are summed with its routing weights.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from . import tuning
from .cpu_info import has_avx512_vnni
from .dot_ir import (
    dot_bf16,
    dot_q4_portable,
    dot_q4_vnni,
    dot_q4w_portable,
    dot_q4w_vnni,
    dot_q8_portable,
    dot_q8_vnni,
)
from .formats import PackedExperts

QBLK = 64  # activation quantization block, one 512-bit vector of int8

_state = {"threads": numba.config.NUMBA_NUM_THREADS, "vnni": has_avx512_vnni()}


def set_num_threads(n: int) -> None:
    """Threads used by later fused_moe calls (from whichever thread calls them)."""
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be in [1, {numba.config.NUMBA_NUM_THREADS}], got {n}")
    _state["threads"] = n


def get_num_threads() -> int:
    return _state["threads"]


def set_vnni(enabled: bool) -> None:
    """Use the vpdpbusd path (when the CPU has it) or the portable one; for tests and benchmarks."""
    _state["vnni"] = bool(enabled) and has_avx512_vnni()


# ---------------------------------------------------------------- shared pieces (serial, inlined)


@numba.njit(cache=True, nogil=True)
def _group_pairs(ids, E):
    """ids [T, K] int32 -> start [E + 1], slot_tok [P], pair_slot [T * K] (-1 skipped), active [A]."""
    T, K = ids.shape
    start = np.zeros(E + 1, np.int64)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            if e >= 0:
                start[e + 1] += 1
    for e in range(E):
        start[e + 1] += start[e]
    pos = start[:E].copy()
    slot_tok = np.empty(start[E], np.int64)
    pair_slot = np.full(T * K, -1, np.int64)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            if e >= 0:
                s = pos[e]
                pos[e] += 1
                slot_tok[s] = t
                pair_slot[t * K + k] = s
    nact = 0
    for e in range(E):
        if start[e + 1] > start[e]:
            nact += 1
    active = np.empty(nact, np.int64)
    nact = 0
    for e in range(E):
        if start[e + 1] > start[e]:
            active[nact] = e
            nact += 1
    return start, slot_tok, pair_slot, active


@numba.njit(cache=True, nogil=True, inline="always")
def _quantize_row(v, n, q, qs, a32):
    """v [>= n] float32 -> q [npad] int8, qs [npad/64] float32 block scales, a32 [npad/32] float64.

    q = rint(v / s) with s = amax / 127 per block of 64 (1 for an all-zero block);
    a32[j] = s * sum of q over inputs 32j..32j+31; entries past n are zero.
    """
    npad = q.shape[0]
    for b in range(npad // 64):
        amax = np.float32(0.0)
        for i in range(b * 64, min(b * 64 + 64, n)):
            amax = max(amax, abs(v[i]))
        s = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
        qs[b] = s
        for half in range(2):
            tot = 0
            for i in range(b * 64 + half * 32, b * 64 + half * 32 + 32):
                qi = 0
                if i < n:
                    qi = int(min(max(np.rint(v[i] / s), np.float32(-127.0)), np.float32(127.0)))
                q[i] = qi
                tot += qi
            a32[2 * b + half] = np.float64(s) * tot


@numba.njit(cache=True, nogil=True, inline="always")
def _silu_mul(g, u):
    # float64 so a float64 reference rounds h to the same float32 before quantizing it again
    return np.float32(g / (1.0 + math.exp(-g)) * u)


@numba.njit(cache=True, nogil=True, inline="always")
def _task(task, nblk, active, start, rows, rb):
    e = active[task // nblk]
    r0 = (task % nblk) * rb
    return e, r0, min(r0 + rb, rows), start[e], start[e + 1]


@numba.njit(cache=True, nogil=True, inline="always")
def _dot_q4(vnni, g_shift, w, wo, a, ao, sa, sao, s, so, z, zo, zs, a32, a32o, nblk):
    if g_shift == 0:
        if vnni:
            return dot_q4_vnni(w, wo, a, ao, sa, sao, s, so, z, zo, zs, a32, a32o, g_shift, nblk)
        return dot_q4_portable(w, wo, a, ao, sa, sao, s, so, z, zo, zs, a32, a32o, g_shift, nblk)
    if vnni:
        return dot_q4w_vnni(w, wo, a, ao, sa, sao, s, so, z, zo, zs, a32, a32o, g_shift, nblk)
    return dot_q4w_portable(w, wo, a, ao, sa, sao, s, so, z, zo, zs, a32, a32o, g_shift, nblk)


@numba.njit(cache=True, nogil=True, inline="always")
def _dot_q8(vnni, w, wo, a, ao, sa, sao, nvec):
    if vnni:
        return dot_q8_vnni(w, wo, a, ao, sa, sao, nvec)
    return dot_q8_portable(w, wo, a, ao, sa, sao, nvec)


# ---------------------------------------------------------------- entry points


@numba.njit(parallel=True, nogil=True, cache=True)
def _moe_quant(x, ids, wts, gu, gus, guz, dn, dns, dnz, out, I, g_shift, rb, tb, vnni, is_int4):  # noqa: E741
    """x [T, H] f32; ids [T, K] i32; wts [T, K] f32; out [T, H] f32.

    Scales and zero points come flattened (1-D views of the packed arrays):
    int8: gu u8 [E, I, 2, Hp], gus f32 [E * I * 2], dn u8 [E, H, Ip], dns f32 [E * H].
    int4: gu u8 [E, I, 2, Hp/2], gus u16 [E * I * 2 * Hp/g], guz u8 same or [1],
          dn u8 [E, H, Ip/2], dns u16 [E * H * Ip/g], dnz u8 same or [1]; g = 32 << g_shift.
    """
    T, H = x.shape
    E = gu.shape[0]
    Hp = gu.shape[3] * (2 if is_int4 else 1)
    Ip = dn.shape[2] * (2 if is_int4 else 1)
    start, slot_tok, pair_slot, active = _group_pairs(ids, E)
    P = slot_tok.shape[0]
    zs_gu = 0 if guz.shape[0] == 1 else 1  # stride 0: one shared zero point (symmetric)
    zs_dn = 0 if dnz.shape[0] == 1 else 1
    ngh = (Hp // 32) >> g_shift  # groups per gate/up row
    ngi = (Ip // 32) >> g_shift

    xq = np.empty((T, Hp), np.int8)  # [T, Hp]
    xs = np.empty((T, Hp // 64), np.float32)  # [T, Hp/64]
    xa = np.empty((T, Hp // 32), np.float64)  # [T, Hp/32]
    xcorr = np.empty(T)  # [T] sum of dequantized activations: int8 codes carry a +128 offset
    for t in prange(T):
        _quantize_row(x[t], H, xq[t], xs[t], xa[t])
        xcorr[t] = xa[t].sum()

    h = np.zeros((P, Ip), np.float32)  # [P, Ip]
    nbi = (I + rb - 1) // rb
    for task in prange(active.shape[0] * nbi):
        e, r0, r1, s0, s1 = _task(task, nbi, active, start, I, rb)
        for tb0 in range(s0, s1, tb):
            for i in range(r0, r1):
                row = (e * I + i) * 2  # gate row; up row follows
                for s in range(tb0, min(tb0 + tb, s1)):
                    t = slot_tok[s]
                    gv = 0.0
                    uv = 0.0
                    if is_int4:
                        for j in range(2):
                            wo = (row + j) * (Hp // 2)
                            go = (row + j) * ngh
                            d = _dot_q4(
                                vnni, g_shift, gu, wo, xq, t * Hp, xs, t * (Hp // 64), gus, go, guz,
                                go * zs_gu, zs_gu, xa, t * (Hp // 32), Hp // 128,
                            )  # fmt: skip
                            if j == 0:
                                gv = d
                            else:
                                uv = d
                    else:
                        corr = xcorr[t]
                        for j in range(2):
                            d = _dot_q8(vnni, gu, (row + j) * Hp, xq, t * Hp, xs, t * (Hp // 64), Hp // 64)
                            d = (d - 128.0 * corr) * np.float64(gus[row + j])
                            if j == 0:
                                gv = d
                            else:
                                uv = d
                    h[s, i] = _silu_mul(gv, uv)

    hq = np.empty((P, Ip), np.int8)  # [P, Ip]
    hs = np.empty((P, Ip // 64), np.float32)  # [P, Ip/64]
    ha = np.empty((P, Ip // 32), np.float64)  # [P, Ip/32]
    hcorr = np.empty(P)  # [P]
    for s in prange(P):
        _quantize_row(h[s], I, hq[s], hs[s], ha[s])
        hcorr[s] = ha[s].sum()

    y = np.empty((P, H), np.float32)  # [P, H]
    nbh = (H + rb - 1) // rb
    for task in prange(active.shape[0] * nbh):
        e, r0, r1, s0, s1 = _task(task, nbh, active, start, H, rb)
        for tb0 in range(s0, s1, tb):
            for r in range(r0, r1):
                row = e * H + r
                for s in range(tb0, min(tb0 + tb, s1)):
                    if is_int4:
                        go = row * ngi
                        d = _dot_q4(
                            vnni, g_shift, dn, row * (Ip // 2), hq, s * Ip, hs, s * (Ip // 64), dns, go, dnz,
                            go * zs_dn, zs_dn, ha, s * (Ip // 32), Ip // 128,
                        )  # fmt: skip
                    else:
                        corr = hcorr[s]
                        d = _dot_q8(vnni, dn, row * Ip, hq, s * Ip, hs, s * (Ip // 64), Ip // 64)
                        d = (d - 128.0 * corr) * np.float64(dns[row])
                    y[s, r] = np.float32(d)

    K = wts.shape[1]
    for t in prange(T):
        for j in range(H):
            out[t, j] = 0.0
        for k in range(K):
            s = pair_slot[t * K + k]
            if s >= 0:
                w = wts[t, k]
                for j in range(H):
                    out[t, j] += w * y[s, j]


@numba.njit(parallel=True, nogil=True, cache=True)
def _moe_bf16(x, ids, wts, gu, dn, out, I, rb, tb):  # noqa: E741
    """x [T, H] f32; ids [T, K] i32; wts [T, K] f32; gu u16 [E, I, 2, Hp]; dn u16 [E, H, Ip]; out [T, H] f32."""
    T, H = x.shape
    E, _, _, Hp = gu.shape
    Ip = dn.shape[2]
    start, slot_tok, pair_slot, active = _group_pairs(ids, E)
    P = slot_tok.shape[0]
    xp = np.zeros((T, Hp), np.float32)  # [T, Hp]
    for t in prange(T):
        for j in range(H):
            xp[t, j] = x[t, j]

    h = np.zeros((P, Ip), np.float32)  # [P, Ip]
    nbi = (I + rb - 1) // rb
    for task in prange(active.shape[0] * nbi):
        e, r0, r1, s0, s1 = _task(task, nbi, active, start, I, rb)
        for tb0 in range(s0, s1, tb):
            for i in range(r0, r1):
                row = (e * I + i) * 2
                for s in range(tb0, min(tb0 + tb, s1)):
                    t = slot_tok[s]
                    gv = dot_bf16(gu, row * Hp, xp, t * Hp, Hp // 64)
                    uv = dot_bf16(gu, (row + 1) * Hp, xp, t * Hp, Hp // 64)
                    h[s, i] = _silu_mul(np.float64(gv), np.float64(uv))

    y = np.empty((P, H), np.float32)  # [P, H]
    nbh = (H + rb - 1) // rb
    for task in prange(active.shape[0] * nbh):
        e, r0, r1, s0, s1 = _task(task, nbh, active, start, H, rb)
        for tb0 in range(s0, s1, tb):
            for r in range(r0, r1):
                for s in range(tb0, min(tb0 + tb, s1)):
                    y[s, r] = dot_bf16(dn, (e * H + r) * Ip, h, s * Ip, Ip // 64)

    K = wts.shape[1]
    for t in prange(T):
        for j in range(H):
            out[t, j] = 0.0
        for k in range(K):
            s = pair_slot[t * K + k]
            if s >= 0:
                w = wts[t, k]
                for j in range(H):
                    out[t, j] += w * y[s, j]


# ---------------------------------------------------------------- wrapper


def _check_inputs(x, topk_ids, topk_weights, experts, out) -> None:
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
    if topk_ids.size and (topk_ids.min() < -1 or topk_ids.max() >= experts.E):
        raise ValueError(
            f"topk_ids must be -1 (skip) or in [0, {experts.E}), got min {topk_ids.min()} max {topk_ids.max()}"
        )
    if out is not None:
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (T, H):
            raise ValueError(
                f"out must be a float32 array of shape {(T, H)}, got {getattr(out, 'shape', out)}"
            )
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")


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
    threads: Numba threads for this call (default: set_num_threads()).
    The GIL is released for the whole computation.
    """
    _check_inputs(x, topk_ids, topk_weights, experts, out)
    if prefer not in ("auto", "decode", "prefill"):
        raise ValueError(f"prefer must be 'auto', 'decode' or 'prefill', got {prefer!r}")
    x = np.ascontiguousarray(x)
    ids = np.ascontiguousarray(topk_ids)
    wts = np.ascontiguousarray(topk_weights)
    if out is None:
        out = np.empty_like(x)
    cfg = tuning.settings(experts.fmt, experts.H, experts.I)
    pairs = int((ids >= 0).sum())
    mode = prefer
    if mode == "auto":
        per_expert = pairs / max(1, min(experts.E, pairs))
        mode = "prefill" if per_expert >= cfg["prefill_tokens_per_expert"] else "decode"
    rb = cfg[f"{mode}_row_block"]
    tb = cfg[f"{mode}_token_block"]
    numba.set_num_threads(threads or _state["threads"])  # thread-local in Numba: set by the calling thread
    ex = experts
    if ex.fmt == "bf16":
        _moe_bf16(x, ids, wts, ex.gate_up, ex.down, out, ex.I, rb, tb)
    else:
        is4 = ex.fmt == "int4"
        shift = int(math.log2(ex.group_size // 32)) if is4 else 0
        _moe_quant(
            x, ids, wts, ex.gate_up, ex.gate_up_scale.reshape(-1), ex.gate_up_zero.reshape(-1), ex.down,
            ex.down_scale.reshape(-1), ex.down_zero.reshape(-1), out, ex.I, shift, rb, tb, _state["vnni"], is4,
        )  # fmt: skip
    return out
