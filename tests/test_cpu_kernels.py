"""cpu_kernels against a float64 numpy reference.

bf16: the reference uses the bf16-rounded weights in float64; tolerance 1e-5 (float32 math).
int8 / int4: the reference applies the kernel's quantization (dequantized weights, activations
quantized per block of 64 to int8, the intermediate rounded to float32 and quantized again);
tolerance 1e-4. The error against float weights and activations is reported and bounded.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import cpu_kernels as ck
from cpu_kernels import formats

ODD = (200, 72)  # H, I: not multiples of 64 / 128


def make_layer(E: int, H: int, I: int, seed: int = 0):  # noqa: E741
    rng = np.random.default_rng(seed)
    gate = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(np.float32)
    up = (rng.standard_normal((E, I, H)) / np.sqrt(H)).astype(np.float32)
    down = (rng.standard_normal((E, H, I)) / np.sqrt(I)).astype(np.float32)
    return gate, up, down


def make_batch(T: int, K: int, E: int, H: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.integers(0, E, (T, K)).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    return x, ids, w


def quant_act(v: np.ndarray) -> np.ndarray:
    """Kernel's activation quantization, written independently: int8 per block of 64, dequantized."""
    n = v.shape[0]
    vp = np.zeros(-(-n // 128) * 128, np.float32)
    vp[:n] = v
    blocks = vp.reshape(-1, 64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(blocks / s), -127, 127)
    return (q.astype(np.float64) * s.astype(np.float64)).reshape(-1)[:n]


def reference(x, ids, w, gate, up, down, quantized: bool) -> np.ndarray:
    T, K = ids.shape
    out = np.zeros(x.shape, np.float64)
    g64, u64, d64 = (a.astype(np.float64) for a in (gate, up, down))
    for t in range(T):
        xt = quant_act(x[t]) if quantized else x[t].astype(np.float64)
        for k in range(K):
            e = ids[t, k]
            if e < 0:
                continue
            g, u = g64[e] @ xt, u64[e] @ xt
            h = (g / (1.0 + np.exp(-g)) * u).astype(np.float32)
            ht = quant_act(h) if quantized else h.astype(np.float64)
            out[t] += np.float64(w[t, k]) * (d64[e] @ ht)
    return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


LAYERS: dict = {}


def packed(fmt: str, g: int, sym: bool, E: int, H: int, I: int):  # noqa: E741
    key = (fmt, g, sym, E, H, I)
    if key not in LAYERS:
        w = make_layer(E, H, I)
        LAYERS[key] = (w, ck.pack_experts(*w, fmt=fmt, group_size=g, symmetric=sym))
    return LAYERS[key]


FORMATS = [("bf16", 0, True), ("int8", 0, True), ("int4", 32, True), ("int4", 64, False), ("int4", 128, True)]
SHAPES = [(1, 1, 4), (3, 2, 8), (64, 8, 64), (64, 2, 16)]  # T, K, E


@pytest.mark.parametrize("fmt,g,sym", FORMATS)
@pytest.mark.parametrize("T,K,E", SHAPES)
def test_fused_moe_matches_reference(fmt, g, sym, T, K, E):
    H, I = ODD  # noqa: E741
    (gate, up, down), experts = packed(fmt, g, sym, E, H, I)
    x, ids, w = make_batch(T, K, E, H, seed=T * 100 + K)
    if T > 1:
        ids[1, 0] = -1  # not on this backend
        ids[2 % T, :] = ids[2 % T, 0]  # one expert repeated within a token
    out = ck.fused_moe(x, ids, w, experts)
    dg, du, dd = ck.dequantize(experts)
    quantized = fmt != "bf16"
    err = rel_err(out, reference(x, ids, w, dg, du, dd, quantized))
    assert err < (1e-4 if quantized else 1e-5), f"{fmt} g={g}: relative error {err:.2e}"
    if fmt == "int8":
        err_float = rel_err(out, reference(x, ids, w, gate, up, down, False))
        print(f"int8 error vs float weights and activations: {err_float:.3e}")
        assert err_float < 2e-2


@pytest.mark.parametrize(
    "fmt,g,sym", [("int8", 0, True), ("int4", 32, False), ("int4", 64, True), ("int4", 128, False)]
)
def test_long_rows_match_reference(fmt, g, sym):
    """Rows of 5 blocks of 128: the int4 dot's four-block loop and its one-block tail both run."""
    H, I, E = 640, 584, 4  # noqa: E741
    (gate, up, down), experts = packed(fmt, g, sym, E, H, I)
    x, ids, w = make_batch(5, 2, E, H, seed=11)
    ids[3, 1] = -1
    out = ck.fused_moe(x, ids, w, experts)
    err = rel_err(out, reference(x, ids, w, *ck.dequantize(experts), quantized=True))
    assert err < 1e-4, f"{fmt} g={g}: relative error {err:.2e}"


def test_scratch_reuse_and_concurrent_calls():
    """Scratch grows and shrinks with T; calls from two threads at once keep their own buffers."""
    H, I, E = 640, 584, 4  # noqa: E741
    _, experts = packed("int4", 64, True, E, H, I)
    batches = [make_batch(T, 2, E, H, seed=T) for T in (2, 9, 1, 9)]
    want = [ck.fused_moe(*b, experts).copy() for b in batches]
    again = [ck.fused_moe(*b, experts) for b in reversed(batches)][::-1]
    for a, b in zip(again, want, strict=True):
        np.testing.assert_array_equal(a, b)
    got: dict = {}

    def work(k):
        got[k] = [ck.fused_moe(*batches[k], experts, threads=1) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        for out in got[k]:
            np.testing.assert_allclose(out, want[k], rtol=1e-6, atol=1e-6)


def test_default_threads_leave_a_core_for_other_callers():
    n = ck.moe.numba.config.NUMBA_NUM_THREADS
    seen = []
    worker = threading.Thread(target=lambda: seen.append(ck.get_num_threads()))
    worker.start()
    worker.join()
    assert ck.get_num_threads() == n
    assert seen == [max(n - 1, 1)]
    ck.set_num_threads(1)
    try:
        assert ck.get_num_threads() == 1
    finally:
        ck.set_num_threads(0)


@pytest.mark.parametrize("fmt,g,sym", FORMATS)
def test_paths_agree(fmt, g, sym):
    """Portable path, prefill blocking, one thread and out= give the same numbers as the default."""
    H, I = 130, 200  # noqa: E741
    _, experts = packed(fmt, g, sym, 6, H, I)
    x, ids, w = make_batch(40, 3, 6, H, seed=7)
    base = ck.fused_moe(x, ids, w, experts, prefer="decode")
    buf = np.full_like(base, np.nan)
    ck.fused_moe(x, ids, w, experts, prefer="prefill", out=buf)
    np.testing.assert_allclose(buf, base, rtol=1e-6, atol=1e-6)
    ck.set_vnni(False)
    try:
        portable = ck.fused_moe(x, ids, w, experts, threads=1)
    finally:
        ck.set_vnni(True)
    np.testing.assert_allclose(portable, base, rtol=1e-6, atol=1e-6)


def test_all_skipped_and_empty():
    _, experts = packed("int8", 0, True, 4, *ODD)
    x, ids, w = make_batch(3, 2, 4, ODD[0])
    out = ck.fused_moe(x, np.full_like(ids, -1), w, experts)
    assert np.all(out == 0)
    assert ck.fused_moe(x[:0], ids[:0], w[:0], experts).shape == (0, ODD[0])


def _two_regions(monkeypatch, *args, **kw):
    """fused_moe with decode steps in two parallel regions (gate/up, then down)."""
    with monkeypatch.context() as m:
        m.setattr(ck.moe, "ONE_REGION_PAIRS", 0)
        return ck.fused_moe(*args, **kw)


@pytest.mark.parametrize(
    "fmt,g,sym", [("int8", 0, True), ("int4", 32, False), ("int4", 64, True), ("int4", 128, False)]
)
def test_one_region_decode_any_thread_count(monkeypatch, fmt, g, sym):
    """Decode steps in one region (threads wait for their down items' experts) give the numbers of
    two regions with 1 thread, all threads, more threads than active experts, and more loop
    iterations than OS threads (each iteration then runs after the others on the same thread)."""
    H, I, E = 640, 584, 8  # noqa: E741
    _, experts = packed(fmt, g, sym, E, H, I)
    n = ck.moe.numba.config.NUMBA_NUM_THREADS
    real = ck.moe.numba.set_num_threads
    for T, K in ((1, 1), (1, 6), (3, 2), (16, 6)):
        # two batches in turn: a down item that ran before its expert's h was complete would read
        # the other batch's h (the scratch is reused), not an equal one
        batches = [make_batch(T, K, E, H, seed=40 + T * K + i) for i in (0, 1)]
        want = [_two_regions(monkeypatch, *b, experts, prefer="decode", threads=1) for b in batches]
        ref = reference(*batches[0], *ck.dequantize(experts), quantized=True)
        assert rel_err(want[0], ref) < 1e-4
        for threads in (1, n):
            for i in range(20):
                out = ck.fused_moe(*batches[i % 2], experts, prefer="decode", threads=threads)
                np.testing.assert_array_equal(out, want[i % 2], err_msg=f"T={T} K={K} threads={threads}")
        for os_threads in sorted({1, n}):  # 8 iterations of the region's loop on fewer threads
            with monkeypatch.context() as m:
                m.setattr(ck.moe.numba, "set_num_threads", lambda k, o=os_threads: real(min(k, o)))
                ck.moe._local.threads = 0  # the count a call last set: set again, through the patch
                for i in range(4):
                    out = ck.fused_moe(*batches[i % 2], experts, prefer="decode", threads=8)
                    np.testing.assert_array_equal(out, want[i % 2], err_msg=f"T={T} K={K} 8 on {os_threads}")


@pytest.mark.parametrize("fmt,g,sym", [("int8", 0, True), ("int4", 64, False)])
def test_one_region_decode_experts_without_tokens(monkeypatch, fmt, g, sym):
    """Active experts 0, 3 and 5 of 8 (the others get no token), a token with no expert on this
    backend, an expert repeated within a token."""
    H, I, E = 640, 584, 8  # noqa: E741
    _, experts = packed(fmt, g, sym, E, H, I)
    x, _, w = make_batch(4, 3, E, H, seed=9)
    ids = np.array([[5, 0, -1], [-1, -1, -1], [3, 3, 5], [0, -1, 3]], np.int32)
    ref = reference(x, ids, w, *ck.dequantize(experts), quantized=True)
    for threads in sorted({1, ck.moe.numba.config.NUMBA_NUM_THREADS}):
        out = ck.fused_moe(x, ids, w, experts, prefer="decode", threads=threads)
        assert np.all(out[1] == 0)
        assert rel_err(out, ref) < 1e-4
        np.testing.assert_array_equal(out, _two_regions(monkeypatch, x, ids, w, experts, prefer="decode"))


@pytest.mark.parametrize("fmt,g,sym", [("int8", 0, True), ("int4", 64, False), ("bf16", 0, True)])
@pytest.mark.parametrize("T,K,defer", [(1, 6, 2), (3, 3, 1), (2, 2, 3), (40, 8, 2)])
def test_deferral_splits_each_token_lightest_pairs(monkeypatch, fmt, g, sym, T, K, defer):
    """out holds each token's on-time pairs plus add, late_out its `defer` lightest pairs of those
    here (all of them when it has no more): the same numbers as two calls on the split ids. The
    flag is set. Decode steps in one region (any thread count) and in two (bf16, 40 tokens)."""
    H, I, E = 640, 584, 8  # noqa: E741
    _, experts = packed(fmt, g, sym, E, H, I)
    x, ids, w = make_batch(T, K, E, H, seed=70 + T * K)
    ids[0, 1] = -1  # not here: never deferred
    add = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    late = ck.moe.late_pairs(ids, w, defer)
    for t in range(T):
        here = np.flatnonzero(ids[t] >= 0)
        want = here[np.argsort(w[t, here], kind="stable")[:defer]]
        assert sorted(np.flatnonzero(late[t])) == sorted(want)
    now_ids, late_ids = np.where(late, -1, ids).astype(np.int32), np.where(late, ids, -1).astype(np.int32)
    for threads in sorted({1, ck.moe.numba.config.NUMBA_NUM_THREADS}):
        want_now = ck.fused_moe(x, now_ids, w, experts, prefer="decode", threads=threads) + add
        want_late = ck.fused_moe(x, late_ids, w, experts, prefer="decode", threads=threads)
        flags = np.zeros(4, np.int32)
        late_out = np.full_like(x, np.nan)
        out = ck.fused_moe(
            x, ids, w, experts, prefer="decode", threads=threads, defer=defer, late_out=late_out, add=add,
            signal=(flags, 2),
        )  # fmt: skip
        np.testing.assert_array_equal(out, want_now)
        np.testing.assert_array_equal(late_out, want_late)
        assert flags.tolist() == [0, 0, 1, 0]
    whole = ck.fused_moe(x, ids, w, experts, prefer="decode")
    assert rel_err(out - add + late_out, whole) < 1e-5
    if fmt != "bf16":  # the same split in two regions
        late_out2 = np.empty_like(x)
        out2 = _two_regions(
            monkeypatch, x, ids, w, experts, prefer="decode", defer=defer, late_out=late_out2, add=add
        )
        np.testing.assert_allclose(out2, out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(late_out2, late_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,g,sym", [("int8", 0, True), ("int4", 64, False), ("bf16", 0, True)])
@pytest.mark.parametrize("T,K,defer", [(1, 6, 0), (1, 6, 2), (40, 8, 0), (40, 8, 2)])
def test_call_waits_for_its_inputs_flag(fmt, g, sym, T, K, defer):
    """With ready=(flags, i), a call made before its inputs are written (another thread writes
    them, then sets the flag) returns what a call made after does, and clears the flag; in one
    region, in two (40 tokens) and on the bf16 path, with and without deferral."""
    H, I, E = 640, 584, 8  # noqa: E741
    _, experts = packed(fmt, g, sym, E, H, I)
    x, ids, w = make_batch(T, K, E, H, seed=90 + T)
    add = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    kw = {"defer": defer, "add": add} if defer else {}
    want_late = np.zeros_like(x)
    want = ck.fused_moe(x, ids, w, experts, late_out=want_late if defer else None, **kw)
    hx, hids, hw = np.full_like(x, np.nan), np.full_like(ids, -7), np.zeros_like(w)
    ready, signal = np.zeros(3, np.int32), np.zeros(3, np.int32)

    def stage():
        time.sleep(0.05)
        hx[:], hids[:], hw[:] = x, ids, w
        ready[1] = 1

    writer = threading.Thread(target=stage)
    writer.start()
    late = np.zeros_like(x)
    out = ck.fused_moe(
        hx, hids, hw, experts, late_out=late if defer else None, signal=(signal, 0), ready=(ready, 1), **kw
    )  # fmt: skip
    writer.join()
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(late, want_late)
    assert ready.tolist() == [0, 0, 0] and signal.tolist() == [1, 0, 0]


@pytest.mark.parametrize("fmt,g,sym", [("int8", 0, True), ("int4", 64, False)])
def test_decode_call_is_fused_moe_on_its_buffers(monkeypatch, fmt, g, sym):
    """A prepared decode call on fixed buffers gives fused_moe's out for each row count (one region,
    and through fused_moe where one region would not run: too many pairs), waits for and clears its
    input flag and sets its own, follows changed work-item settings, and raises fused_moe's errors."""
    from cpu_kernels import moe

    H, I, E, K, S = 200, 136, 8, 8, 40  # noqa: E741
    _, experts = packed(fmt, g, sym, E, H, I)
    x, ids, w = make_batch(S, K, E, H, seed=5)
    hx, hids, hw, hout = np.zeros_like(x), np.zeros_like(ids), np.zeros_like(w), np.zeros_like(x)
    ready, signal = np.zeros(3, np.int32), np.zeros(3, np.int32)
    call = ck.DecodeCall(hx, hids, hw, experts, hout, signal=(signal, 2), ready=(ready, 1))
    assert 3 <= call.max_live < S  # S tokens of 8 experts: fused_moe would not take them as one region
    calls = []
    monkeypatch.setattr(
        moe, "fused_moe", lambda *a, **kw: calls.append(a[0].shape[0]) or ck.fused_moe(*a, **kw)
    )
    for live in (1, 3, 1, S):  # S * K pairs: more than one region takes
        hx[:live], hids[:live], hw[:live] = x[:live], ids[:live], w[:live]
        ready[1] = 1
        call(live)
        np.testing.assert_array_equal(hout[:live], ck.fused_moe(x[:live], ids[:live], w[:live], experts))
        assert ready.tolist() == [0, 0, 0] and signal.tolist() == [0, 0, 1]
        signal[2] = 0
    assert calls == [S]
    trace = moe.set_trace(2)  # traced: its row of the trace, then untraced again
    try:
        for _ in range(3):
            ready[1] = 1
            call(1)
            signal[2] = 0
    finally:
        moe.set_trace(0)
    assert (trace[:, ck.moe_kernels.TR_OUT] != 0).all() and calls == [S]
    ready[1] = 1
    call(1)
    moe.set_knobs(fmt, H, I, decode_items_per_thread=1)
    try:
        ready[1] = 1
        call(3)
        np.testing.assert_array_equal(hout[:3], ck.fused_moe(x[:3], ids[:3], w[:3], experts))
    finally:
        moe._settings.pop((fmt, H, I))
    hids[0, 0] = E
    ready[1] = 1
    with pytest.raises(ValueError, match="topk_ids must be"):
        call(1)
    monkeypatch.setattr(moe, "READY_POLLS", 1000)
    late = ck.DecodeCall(hx, hids, hw, experts, hout, signal=(signal, 2), ready=(ready, 1))
    with pytest.raises(RuntimeError, match="never marked ready"):
        late(1)
    with pytest.raises(ValueError, match="float32"):
        ck.DecodeCall(hx.astype(np.float64), hids, hw, experts, hout, signal=(signal, 2), ready=(ready, 1))


@pytest.mark.parametrize("fmt,T", [("int4", 1), ("int4", 40), ("bf16", 1)])
def test_call_gives_up_on_inputs_never_staged(monkeypatch, fmt, T):
    """An input flag never set: the call raises after its polls instead of hanging, and says why."""
    _, experts = packed(fmt, 64 if fmt == "int4" else 0, True, 4, *ODD)
    x, ids, w = make_batch(T, 2, 4, ODD[0])
    monkeypatch.setattr(ck.moe, "READY_POLLS", 1000)
    with pytest.raises(RuntimeError, match="never marked ready"):
        ck.fused_moe(x, ids, w, experts, ready=(np.zeros(2, np.int32), 1))


def test_trace_gaps_between_calls():
    """The gap from a call's out to the next call's inputs, in call order, and the threads that were
    in before the inputs; rows no call filled are skipped."""
    from cpu_kernels import moe_kernels as mk
    from cpu_kernels.probe import trace_gaps

    rows = np.zeros((4, mk.TR_THREADS + mk.TR_THREAD * 3), np.int64)
    calls = [
        (100, 300, (90, 95, 120)),
        (340, 500, (330, 335, 338)),
        (0, 0, (0, 0, 0)),
        (580, 700, (600, 610, 570)),
    ]
    for i, (ready, out, enters) in enumerate(calls):  # the third: a row no call filled
        rows[i, mk.TR_READY], rows[i, mk.TR_OUT], rows[i, mk.TR_NTHR] = ready, out, 3 if out else 0
        rows[i, mk.TR_THREADS : mk.TR_THREADS + 3 * mk.TR_THREAD : mk.TR_THREAD] = enters
    got = trace_gaps(rows, 1e6)  # one cycle a microsecond
    assert got["gap_us"] == 60.0  # 340 - 300 and 580 - 500
    assert got["threads_in_before_inputs"] == 2.0  # 2, 3 and 1
    assert got["gap_p90_us"] == pytest.approx(76.0)
    assert trace_gaps(rows[:1], 1e6) == {}


def test_work_item_knobs_and_call_trace():
    """Work-item sizes change how a decode call splits its work, not its numbers; a traced call
    records when its parts happened; bad knobs are refused with their names."""
    from cpu_kernels import moe, probe
    from cpu_kernels import moe_kernels as mk

    H, I = 512, 384  # noqa: E741  (several gate/up and down items an expert at the defaults)
    w, experts = packed("int4", 64, True, 8, H, I)
    x, ids, wt = make_batch(1, 4, 8, H)
    base = ck.fused_moe(x, ids, wt, experts, threads=2)
    np.testing.assert_allclose(
        base, reference(x, ids, wt, *ck.dequantize(experts), True), rtol=1e-4, atol=1e-5
    )
    try:
        moe.set_knobs("int4", H, I, decode_items_per_thread=1, decode_gate_up_rows=128, decode_down_rows=256)
        trace = moe.set_trace(2)
        got = ck.fused_moe(x, ids, wt, experts, threads=2)
    finally:
        moe.set_trace(0)
        moe._settings.pop(("int4", H, I), None)
    np.testing.assert_array_equal(got, base)
    for qb in (3, 64):  # the input's 8 blocks claimed 3 at a time (the last claim short), or at once
        try:
            moe.set_knobs("int4", H, I, decode_quant_blocks=qb)
            np.testing.assert_array_equal(ck.fused_moe(x, ids, wt, experts, threads=2), base)
        finally:
            moe._settings.pop(("int4", H, I), None)
    row = trace[0]
    assert row[mk.TR_NTHR] == 2
    assert 0 < row[mk.TR_ENTRY] <= row[mk.TR_START] <= row[mk.TR_END]  # the calling thread's own
    for slot in (mk.TR_READY, mk.TR_PREP, mk.TR_OUT):
        assert row[mk.TR_ENTRY] <= row[slot] <= row[mk.TR_END], slot
    parts = probe.trace_parts(row, probe.cycle_hz())
    assert parts is not None and parts["kernel_us"] > 0
    assert not trace[1].any(), "one call fills one row"
    with pytest.raises(ValueError, match="rows >= 64"):
        moe.set_knobs("int4", H, I, decode_down_rows=8)
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        moe.set_knobs("int4", H, I, decode_quant_blocks=0)
    with pytest.raises(ValueError, match="unknown knobs"):
        moe.set_knobs("int4", H, I, decode_rows=64)


@pytest.mark.parametrize("fmt,g", [("int8", 0), ("int4", 64)])
def test_quantizer_round_trip(fmt, g):
    """Dequantized weights are exactly representable: packing them again gives the same bytes."""
    w = make_layer(3, *ODD)
    p = ck.pack_experts(*w, fmt=fmt, group_size=g)
    again = ck.pack_experts(*ck.dequantize(p), fmt=fmt, group_size=g)
    for name in ("gate_up", "down", "gate_up_scale", "down_scale"):
        np.testing.assert_array_equal(getattr(again, name), getattr(p, name), err_msg=name)
    gate, deq = w[0], ck.dequantize(p)[0]
    step = np.abs(gate).max(axis=-1, keepdims=True) / (127 if fmt == "int8" else 7)
    assert np.all(np.abs(deq - gate) <= step)


def test_expert_subset_and_nbytes():
    w = make_layer(6, 128, 64)
    sub = ck.pack_experts(*w, fmt="int4", group_size=32, expert_ids=[4, 1])
    full = ck.pack_experts(*w, fmt="int4", group_size=32)
    np.testing.assert_array_equal(sub.gate_up, full.gate_up[[4, 1]])
    assert sub.E == 2 and sub.nbytes == full.nbytes // 3
    # I = 64 pads to 128: gate_up 64x2x64 B, down 128x64 B, fp16 scales per group of 32
    assert full.nbytes == 6 * (64 * 2 * 64 + 128 * 64 + (64 * 2 * 4 + 128 * 4) * 2)


def test_numa_partition_matches_single():
    E, (H, I) = 10, ODD  # noqa: E741
    w = make_layer(E, H, I)
    single = ck.pack_experts(*w, fmt="int8")
    numa = ck.pack_experts_numa(*w, nodes=[[0], [ck.moe.numba.config.NUMBA_NUM_THREADS - 1]], fmt="int8")
    assert [len(p) for p in numa.ids] == [5, 5]
    x, ids, wt = make_batch(5, 3, E, H)
    ids[0, 1] = -1
    np.testing.assert_allclose(
        ck.fused_moe_numa(x, ids, wt, numa), ck.fused_moe(x, ids, wt, single), rtol=1e-5
    )
    assert [len(p) for p in ck.partition_experts(7, 3)] == [3, 2, 2]


def test_gil_released():
    _, experts = packed("bf16", 0, True, 64, 512, 512)
    x, ids, w = make_batch(64, 8, 64, 512)
    ck.fused_moe(x, ids, w, experts)
    t0 = time.perf_counter()
    ck.fused_moe(x, ids, w, experts)
    once = time.perf_counter() - t0
    ticks = 0
    worker = threading.Thread(target=lambda: [ck.fused_moe(x, ids, w, experts) for _ in range(5)])
    worker.start()
    while worker.is_alive():
        ticks += 1
        time.sleep(once / 20)
    assert ticks > 20, f"main thread ran only {ticks} times during 5 kernel calls"


def _bad_calls():
    _, experts = packed("int8", 0, True, 4, *ODD)
    x, ids, w = make_batch(3, 2, 4, ODD[0])
    yield "x must be", (x.astype(np.float64), ids, w, experts), {}
    yield "hidden size", (x[:, :-1].copy(), ids, w, experts), {}
    yield "topk_ids must be", (x, ids.astype(np.int64), w, experts), {}
    yield r"\[0, 4\)", (x, ids + 4, w, experts), {}
    yield r"-1 \(skip\)", (x, ids - 3, w, experts), {}
    yield "topk_weights", (x, ids, w[:, :1].copy(), experts), {}
    yield "PackedExperts", (x, ids, w, {"fmt": "int8"}), {}
    yield "out must", (x, ids, w, experts), {"out": np.empty((2, ODD[0]), np.float32)}
    yield "prefer", (x, ids, w, experts), {"prefer": "fast"}
    yield "defer must", (x, ids, w, experts), {"defer": 1}
    yield "late_out must", (x, ids, w, experts), {"defer": 1, "late_out": np.empty((3, 5), np.float32)}
    yield "add must", (x, ids, w, experts), {"add": x.astype(np.float64)}
    yield "signal must", (x, ids, w, experts), {"signal": (np.zeros(2, np.int64), 0)}
    yield "signal index", (x, ids, w, experts), {"signal": (np.zeros(2, np.int32), 2)}
    yield "ready must", (x, ids, w, experts), {"ready": (np.zeros(2, np.uint32), 0)}
    yield "ready index", (x, ids, w, experts), {"ready": (np.zeros(2, np.int32), -1)}


@pytest.mark.parametrize("match,args,kw", list(_bad_calls()))
def test_bad_input_raises(match, args, kw):
    with pytest.raises(ValueError, match=match):
        ck.fused_moe(*args, **kw)


def test_bad_pack_raises():
    gate, up, down = make_layer(2, 64, 32)
    with pytest.raises(ValueError, match="fmt"):
        ck.pack_experts(gate, up, down, fmt="int3")
    with pytest.raises(ValueError, match="group_size"):
        ck.pack_experts(gate, up, down, fmt="int4", group_size=48)
    with pytest.raises(ValueError, match="down must have shape"):
        ck.pack_experts(gate, up, down[:, :, :-1], fmt="int8")
    with pytest.raises(ValueError, match="float32"):
        ck.pack_experts(gate.astype(np.float64), up, down)
    with pytest.raises(ValueError, match="expert_ids"):
        ck.pack_experts(gate, up, down, expert_ids=[2])


def test_bf16_bits_round_to_nearest_even():
    v = np.array([1.0, 1.00390625, 1.01171875, -2.5e-3], np.float32)
    back = formats.from_bf16_bits(formats.to_bf16_bits(v))
    np.testing.assert_array_equal(back[:3], np.array([1.0, 1.0, 1.015625], np.float32))
    assert abs(back[3] - v[3]) <= abs(v[3]) * 2**-8


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_int4_zero_points_cover_groups_of_one_sign(sign):
    """Asymmetric int4 keeps 0 on the grid (its zero point is a whole level), so a group whose
    values all share a sign spans 0 to its far end: the error stays within half a step."""
    from cpu_kernels.formats import dequantize_int4, quantize_int4

    rng = np.random.default_rng(3)
    w = sign * rng.uniform(1.0, 2.0, (4, 128)).astype(np.float32)
    w[1, :64] = -w[1, :64]  # groups of both signs and of one sign side by side
    packed, scales, zeros = quantize_int4(w, 32, False)
    err = np.abs(dequantize_int4(packed, scales, zeros, 32, 128) - w)
    step = np.maximum(np.abs(w).reshape(4, -1, 32).max(-1), 0) / 15 * 2  # the widest a group's step can be
    assert (err.reshape(4, -1, 32).max(-1) <= step / 2 * 1.01).all()


# ---------------------------------------------------------------- four-row dots


@pytest.mark.parametrize(
    "fmt,g,sym", [("int8", 0, True), ("int4", 32, False), ("int4", 64, True), ("int4", 128, False)]
)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T,K,E", [(1, 1, 4), (3, 2, 8), (64, 8, 8)])
def test_row_remainders_match_reference(fmt, g, sym, threads, T, K, E):
    """Work items whose row counts are not multiples of four (H = 203, I = 71): the four-stream
    dots and the one-row rest both run, in decode (whole items) and prefill (row blocks) order."""
    H, I = 203, 71  # noqa: E741
    _, experts = packed(fmt, g, sym, E, H, I)
    x, ids, w = make_batch(T, K, E, H, seed=5 * T + K + 1)
    if T > 2:
        ids[2, -1] = -1
    ref = reference(x, ids, w, *ck.dequantize(experts), quantized=True)
    for prefer in ("decode", "prefill"):
        out = ck.fused_moe(
            x, ids, w, experts, prefer=prefer, threads=min(threads, ck.moe.numba.config.NUMBA_NUM_THREADS)
        )
        err = rel_err(out, ref)
        assert err < 1e-4, f"{fmt} g={g} {prefer}: relative error {err:.2e}"


def _row_dot_callers():
    from cpu_kernels.moe_kernels import _q4_rows, _q8_rows, numba

    def q4(R):
        @numba.njit
        def call(vnni, gsel, sym, w, wo, wst, a, sa, ac, s, so, sst, z, nblk, out):
            v = _q4_rows(vnni, gsel, sym, R, w, wo, wst, a, 0, sa, 0, ac, 0, s, so, sst, z, nblk)
            for r in range(R):
                out[r] = v[r]

        return call

    def q8(R):
        @numba.njit
        def call(vnni, w, wo, wst, a, sa, ac, nblk, out):
            v = _q8_rows(vnni, R, w, wo, wst, a, 0, sa, 0, ac, 0, nblk)
            for r in range(R):
                out[r] = v[r]

        return call

    return {R: q4(R) for R in (1, 2, 4)}, {R: q8(R) for R in (1, 2, 4)}


ROW_DOTS: dict = {}


def _int8_activations(rng, n: int):
    """a int8 [n], sa [n / 64], ac int32 [n / 4] as the kernel lays them out; a * sa in float64."""
    a = rng.integers(-127, 128, n).astype(np.int8)
    sa = rng.uniform(0.5, 1.5, n // 64).astype(np.float32)
    ac = (-128 * a.reshape(-1, 4).astype(np.int32).sum(1)).astype(np.int32)
    return a, sa, ac, a.astype(np.float64) * np.repeat(sa.astype(np.float64), 64)


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("vnni", [True, False])
def test_row_dots_match_numpy(R, vnni):
    """dot_q4_rows / dot_q8_rows against float64 numpy: every group size, zero points or not,
    rows a stride apart, lengths across the int4 scale pre-pass's segment and 8-block units."""
    if not ROW_DOTS:
        ROW_DOTS["q4"], ROW_DOTS["q8"] = _row_dot_callers()
    vnni = vnni and ck.has_avx512_vnni()
    rng = np.random.default_rng(R)
    nrows, stride = 13, 3  # rows 1, 4, 7, 10 of 13
    out = np.zeros(R, np.float32)
    for nblk in (1, 3, 8, 9, 33, 70):  # blocks of 128 inputs
        n = 128 * nblk
        a, sa, ac, a64 = _int8_activations(rng, n)
        for gsel, g in enumerate((32, 64, 128)):
            for sym in (True, False):
                w = rng.integers(0, 256, (nrows, n // 2), dtype=np.uint8)
                s = rng.uniform(0.5, 1.5, (nrows, n // g)).astype(np.float16).view(np.uint16)
                z = np.full(1, 8, np.uint8) if sym else rng.integers(0, 16, (nrows, n // g)).astype(np.uint8)
                ROW_DOTS["q4"][R](
                    vnni, gsel, sym, w.reshape(-1), n // 2, stride * n // 2, a, sa, ac, s.reshape(-1),
                    n // g, stride * (n // g), z.reshape(-1), nblk, out,
                )  # fmt: skip
                zz = np.full(s.shape, 8.0) if sym else z.astype(np.float64)
                q = formats.unpack_int4(w).astype(np.float64).reshape(nrows, -1, g) - zz[..., None]
                wd = (q * s.view(np.float16).astype(np.float64)[..., None]).reshape(nrows, -1)
                want = wd[1 : 1 + stride * R : stride] @ a64
                # float32 sums of exact int32 dots (zero points subtracted in int32): the error is
                # within half of float32's epsilon of the sum of the terms' magnitudes
                size = np.abs(wd[1 : 1 + stride * R : stride]) @ np.abs(a64)
                err = (np.abs(out - want) / size).max()
                assert err < 6e-8, f"g={g} sym={sym} nblk={nblk}: error {err:.2e} of sum |terms|"
    for nb64 in (1, 2, 3, 5, 17, 66):  # int8 rows: blocks of 64
        m = 64 * nb64
        a, sa, ac, a64 = _int8_activations(rng, m)
        w8 = rng.integers(1, 256, (nrows, m), dtype=np.uint8)
        ROW_DOTS["q8"][R](vnni, w8.reshape(-1), m, stride * m, a, sa, ac, nb64, out)
        want = (w8[1 : 1 + stride * R : stride].astype(np.float64) - 128) @ a64
        tol = 2e-6 * np.abs(want).max()
        np.testing.assert_allclose(out, want, rtol=2e-6, atol=tol, err_msg=f"int8 blocks={nb64}")


@pytest.mark.parametrize("fmt,symmetric", [("bf16", True), ("int8", True), ("int4", True), ("int4", False)])
def test_pack_into_a_layer_in_parts(fmt, symmetric):
    """A layer packed a few experts at a time into one set of arrays equals the layer packed at once."""
    rng = np.random.default_rng(11)
    E, H, I = 5, 200, 72  # noqa: E741
    gate, up = (rng.standard_normal((E, I, H)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((E, H, I)).astype(np.float32)
    whole = ck.pack_experts(gate, up, down, fmt=fmt, group_size=32, symmetric=symmetric)
    layer = formats.empty_packed(fmt, E, H, I, 32, symmetric)
    for s in (0, 2, 4):
        ids = list(range(s, min(E, s + 2)))
        sub = (gate[ids], up[ids], down[ids])
        ck.pack_experts(*sub, fmt=fmt, group_size=32, symmetric=symmetric, into=layer, start=s)
    for a, b in zip(formats.dequantize(whole), formats.dequantize(layer)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cannot pack"):
        ck.pack_experts(gate, up, down, fmt=fmt, group_size=32, symmetric=symmetric, into=layer, start=1)


# ---------------------------------------------------------------- int4 zero points, many draws


def _quant_rows(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of v [P, n] float32 quantized as the kernel does (blocks of 64): dequantized (float64),
    v / scale (float32) and each input's scale, all [P, n]."""
    P, n = v.shape
    vp = np.zeros((P, -(-n // 128) * 128), np.float32)
    vp[:, :n] = v
    blocks = vp.reshape(P, -1, 64)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    r = blocks / s
    q = np.clip(np.rint(r), -127, 127)
    s_in = np.broadcast_to(s, blocks.shape).reshape(P, -1)[:, :n]
    return (q * s.astype(np.float64)).reshape(P, -1)[:, :n], r.reshape(P, -1)[:, :n], s_in


def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T without BLAS threads (slow to start on a loaded machine, for these small sizes)."""
    return np.einsum("pk,ik->pi", a, b)


def reference_with_ties(
    x: np.ndarray,
    ids: np.ndarray,
    w: np.ndarray,
    gate: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    c: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The quantized reference (as ``reference``) and how far each output may move through the
    intermediate's quantization: (out, slack), both [T, H] float64.

    A kernel whose gate and up dots are exact up to float32 scaling and accumulation stays within
    c * sum |terms| of each dot. An h value within that error (carried through silu(g) * u, its
    block's scale and the float32 roundings of h) of a rounding tie may be quantized either way:
    each one adds |w| * its scale * |its column of down| to the slack.
    """
    xq, _, _ = _quant_rows(x)
    out = np.zeros(x.shape, np.float64)
    slack = np.zeros(x.shape, np.float64)
    for e in np.unique(ids[ids >= 0]):
        tok, kk = np.nonzero(ids == e)
        g64, u64, d64 = (a[e].astype(np.float64) for a in (gate, up, down))
        xe = xq[tok]  # [P, H]
        g, u = _mm(xe, g64), _mm(xe, u64)  # [P, I]
        dg, du = c * _mm(np.abs(xe), np.abs(g64)), c * _mm(np.abs(xe), np.abs(u64))
        sig = 1.0 / (1.0 + np.exp(-g))
        h = (g * sig * u).astype(np.float32)
        dh = np.abs(u * sig * (1 + g * (1 - sig))) * dg + np.abs(g * sig) * du + 2.0**-23 * np.abs(h)
        hq, r, s = _quant_rows(h)
        # a block's scale moves with its largest |h| (and one float32 rounding)
        P, n = h.shape
        nb = -(-n // 64)
        ha, da = np.zeros((P, nb * 64)), np.zeros((P, nb * 64))
        ha[:, :n], da[:, :n] = np.abs(h), dh
        top = ha.reshape(P, nb, 64).argmax(axis=2)[..., None]  # [P, nb, 1]
        top_h = np.take_along_axis(ha.reshape(P, nb, 64), top, 2)[..., 0]
        top_d = np.take_along_axis(da.reshape(P, nb, 64), top, 2)[..., 0]
        rel_s = np.repeat(top_d / np.maximum(top_h, 1e-30) + 2.0**-23, 64, axis=1)[:, :n]
        r64 = r.astype(np.float64)
        tie = np.abs(r64 - np.floor(r64) - 0.5) <= dh / s + np.abs(r64) * rel_s
        wt = w[tok, kk].astype(np.float64)[:, None]
        np.add.at(out, tok, wt * _mm(hq, d64))
        np.add.at(slack, tok, np.abs(wt) * _mm(tie * s, np.abs(d64)))
    return out, slack


@pytest.mark.parametrize("g", [32, 64, 128])
def test_int4_zero_points_many_draws(g: int) -> None:
    """Asymmetric int4 across weight and input draws, T, K and odd sizes, inputs centred on 0 and
    on 1 (a large sum of activations for the zero points to cancel): the zero points are
    subtracted in int32, so beyond 1e-4 the output differs from the reference only through
    intermediate values at rounding ties (which float32 may round either way)."""
    H, I, E = ODD[0], ODD[1], 8  # noqa: E741
    for seed in range(8):
        experts = ck.pack_experts(
            *make_layer(E, H, I, seed=20 + seed), fmt="int4", group_size=g, symmetric=False
        )
        deq = ck.dequantize(experts)
        for T in (1, 3, 64):
            for K in (1, 2, 8):
                x, ids, w = make_batch(T, K, E, H, seed=100 * seed + 10 * T + K)
                x += np.float32(seed % 2)
                out = ck.fused_moe(x, ids, w, experts, threads=1)  # same numbers with any count
                # c = 2e-8, about float32's epsilon / 6: the row dots' error (test_row_dots_match_numpy)
                ref, slack = reference_with_ties(x, ids, w, *deq, c=2e-8)
                err, size = np.linalg.norm(out - ref), np.linalg.norm(ref)
                assert err <= 1e-4 * size + np.linalg.norm(slack), (
                    f"seed={seed} T={T} K={K}: relative error {err / size:.2e}, "
                    f"from values at rounding ties at most {np.linalg.norm(slack) / size:.2e}"
                )


def test_kernel_cache_keys_on_the_inlined_intrinsics(monkeypatch):
    """The on-disk cache of a kernel is stamped with dot_ir.py's contents too, not only its own file's:
    a changed dot_ir.py recompiles the kernels instead of loading the old machine code."""
    from numba.core import caching

    from cpu_kernels import _cache, formats, moe_kernels

    for kernel in (moe_kernels._moe_quant, formats._int4_codes):
        loc = kernel._cache._impl.locator
        assert isinstance(loc, (_cache.InTreeLocator, _cache.UserWideLocator, _cache.UserProvidedLocator))
        before = loc.get_source_stamp()
        own = caching.InTreeCacheLocator(kernel.py_func, loc._py_file).get_source_stamp()
        assert before != own
        monkeypatch.setattr(_cache, "dependencies_digest", lambda: b"another dot_ir.py")
        assert loc.get_source_stamp() != before
        monkeypatch.undo()
        assert loc.get_source_stamp() == before


@pytest.mark.parametrize("n", [2048, 1408, 130, 64, 5])
def test_activation_blocks_match_numpy(n):
    """The kernels' activation quantization (int8 codes, per-block scales, vpdpbusd seeds) equals a
    numpy version bit for bit, on whole and partial blocks, a zero block and signed zeros."""
    import numba

    from cpu_kernels.moe_kernels import _quantize_block

    @numba.njit
    def run(v, n, q, qs, qc):
        for b in range(q.shape[0] // 64):
            _quantize_block(v, n, b, q, qs, qc)

    rng = np.random.default_rng(n)
    v = (rng.standard_normal(n + 64) * rng.choice([1e-3, 1.0, 50.0], n + 64)).astype(np.float32)
    v[64:128], v[3], v[10] = 0.0, 0.0, -0.0
    npad = -(-n // 64) * 64
    q, qs, qc = np.full(npad, 99, np.int8), np.zeros(npad // 64, np.float32), np.zeros(npad // 4, np.int32)
    run(v, n, q, qs, qc)
    blocks = np.where(np.arange(npad) < n, v[:npad], np.float32(0)).reshape(-1, 64)
    amax = np.abs(blocks).max(axis=1)
    s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    ref = np.clip(np.rint(blocks / s[:, None]), -127, 127).astype(np.int8).reshape(-1)
    np.testing.assert_array_equal(q, ref)
    np.testing.assert_array_equal(qs, s)
    np.testing.assert_array_equal(qc, -128 * ref.astype(np.int32).reshape(-1, 4).sum(axis=1))
