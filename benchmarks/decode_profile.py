"""Where a decode step of an offloaded model spends its time.

    python benchmarks/decode_profile.py MODEL_DIR --gpu-mem 6GiB [--experts int4] [--steps 16]

Profiles a few decode steps (torch profiler, CPU and CUDA) and traces their CPU expert calls
(where a call's time goes, from the kernel's own timestamps), then times one layer's CPU expert
kernel alone: called from the main thread, and from the engine's worker thread with nothing else
running. Prints the top operators and a table last; writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

# benchmarks/gpu_kernels.py would shadow the gpu_kernels package for scripts run from here.
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hetero.bench import cap_device_memory, ram_expert_bytes_per_token  # noqa: E402
from hetero.experts import HybridExperts  # noqa: E402
from hetero.runtime import RuntimeOptions, load_runtime  # noqa: E402
from hetero.sampling import SamplingParams  # noqa: E402
from placement.units import parse_size  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def time_cpu_layer(experts: HybridExperts, hidden: int, top_k: int, calls: int = 50) -> dict[str, float]:
    """ms per call of one layer's CPU kernel for one token, from the main and the worker thread."""
    import cpu_kernels

    packed = experts.cpu.packed
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, hidden), dtype=np.float32)
    w = np.full((1, top_k), 1.0 / top_k, np.float32)
    out = np.empty((1, hidden), np.float32)
    local = experts.cpu_local.cpu().numpy()

    def ids():
        chosen = rng.choice(experts.num_experts, top_k, replace=False)
        return local[chosen].astype(np.int32)[None]  # -1 where the expert is on the device

    def run():
        cpu_kernels.fused_moe(x, ids(), w, packed, out=out)

    run()
    t = time.perf_counter()
    for _ in range(calls):
        run()
    main_ms = (time.perf_counter() - t) / calls * 1e3
    worker = experts.cpu.handoff.worker
    worker.submit(run).result()
    t = time.perf_counter()
    for _ in range(calls):
        worker.submit(run).result()
    worker_ms = (time.perf_counter() - t) / calls * 1e3
    return {"main_thread_ms": main_ms, "worker_thread_ms": worker_ms, "bytes": packed.expert_nbytes() * top_k}


def replay_times(engine, steps: int) -> dict:
    """Unprofiled decode steps: the host time of each CUDA graph launch (``CUDAGraph.replay``),
    and ms per step in each part of ``Engine.step``: scheduling, loading the step's inputs, the
    program's replay (graph launches, CPU calls, waits for the GPU, the rest), and sampling;
    ``step_rest`` is the step's own Python."""
    graphs = engine.graphs
    timings = engine.model.worker.timings
    before = (timings.cpu_experts, timings.copies, timings.calls)
    spent: dict[str, float] = {}
    took: list[float] = []

    def timed(obj, name: str, key: str):
        orig = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t

        setattr(obj, name, wrapper)
        return lambda: delattr(obj, name)

    undo = [
        timed(engine.scheduler, "schedule", "schedule"),
        timed(engine, "postprocess", "sample"),
        timed(graphs, "_load", "load"),
        timed(graphs, "_replay", "replay"),
    ]
    orig_replay = torch.cuda.CUDAGraph.replay

    def replay(graph) -> None:
        t = time.perf_counter()
        orig_replay(graph)
        took.append(time.perf_counter() - t)

    torch.cuda.CUDAGraph.replay = replay
    try:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    finally:
        torch.cuda.CUDAGraph.replay = orig_replay
        for u in undo:
            u()
    calls = max(timings.calls - before[2], 1)
    cpu, wait = timings.cpu_experts - before[0], timings.copies - before[1]
    split = {k: v / steps * 1e3 for k, v in spent.items()}
    split.update(
        step=total / steps * 1e3,
        replay_cpu_calls=cpu / steps * 1e3,
        replay_waits=wait / steps * 1e3,
        replay_launches=sum(took) / steps * 1e3,
    )
    split["replay_rest"] = split["replay"] - sum(
        split[f"replay_{k}"] for k in ("cpu_calls", "waits", "launches")
    )
    split["step_rest"] = split["step"] - sum(
        split.get(k, 0.0) for k in ("schedule", "load", "replay", "sample")
    )
    split["outside_cpu_calls"] = split["step"] - split["replay_cpu_calls"]
    took.sort()
    out = {
        "launch": graphs.launch,
        "step_ms": total / steps * 1e3,
        "cpu_call_us": cpu / calls * 1e6,
        "cpu_wait_for_gpu_us": wait / calls * 1e6,
        "cpu_calls_per_step": calls / steps,
        "replays_per_step": len(took) / steps,
        "replay_host_us_median": took[len(took) // 2] * 1e6 if took else None,
        "replay_host_us_mean": sum(took) / max(len(took), 1) * 1e6,
        "step_split_ms": split,
    }
    print("unprofiled steps:", {k: round(v, 2) for k, v in out.items() if isinstance(v, float)})
    print("step split (ms per step):", {k: round(v, 3) for k, v in split.items()})
    return out


def kernel_trace(engine, steps: int) -> dict:
    """The CPU expert calls of ``steps`` decode steps traced (``cpu_kernels.moe.set_trace``):
    medians of their parts in microseconds, from the kernel's entry (made ahead of its inputs)
    through the wait for them, its preparation, the region's start and work, to out whole; and
    the gap from one call's out to the next one's inputs (``trace_gaps``)."""
    from cpu_kernels import moe
    from cpu_kernels.probe import cycle_hz, trace_gaps, trace_medians

    hz = cycle_hz()
    trace = moe.set_trace(steps * len(engine.model.model.layers))
    try:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    finally:
        moe.set_trace(0)
    out = {**trace_medians(trace, hz), **trace_gaps(trace, hz)}
    print("in-step kernel trace (us, medians):", {k: round(v, 1) for k, v in out.items()})
    return out


def in_step_calls(engine, steps: int) -> dict:
    """Where an in-step CPU call's time goes: each hand-off of ``steps`` decode steps runs its
    kernel and, beside it, the same layer on as many other RAM experts (fresh weights, from DRAM),
    alternating which goes first. The first call after the GPU's segment against the second, and
    the step's own ids against fresh ones, tell a cost of the moment (threads, caches after the GPU
    work) from one of the call itself. Diagnostic only: the extra calls slow the steps."""
    import cpu_kernels
    from hetero import decode_program

    rng = np.random.default_rng(1)
    orig = decode_program.run_handoff
    rows: list[tuple[int, float, float]] = []  # (first is the step's own call, first, second) seconds
    pairs: list[int] = []
    flip = [0]

    def timed(h, live, flags, ready=None):
        try:
            measure(h, live, ready)
        finally:
            if flags is not None:
                flags[h.slot] = 1  # the graph after the join waits on it

    def measure(h, live, ready):
        if h.waits and ready is not None:  # the staging sets this flag instead of an event the host waits on
            cpu_kernels.moe.wait_ready(ready, h.slot, cpu_kernels.moe.READY_POLLS)
        else:
            h.ready.synchronize()
        x, ids, w, out = (a[:live] for a in h.args)
        packed = h.fn.__self__.packed
        n = int((ids >= 0).sum())
        fresh = np.full_like(ids, -1)
        fresh.reshape(-1)[:n] = rng.choice(packed.E, n, replace=False)
        spare = np.empty_like(out)
        own_first = flip[0] % 2 == 0
        flip[0] += 1
        calls = [lambda: h.fn(x, ids, w, out), lambda: cpu_kernels.fused_moe(x, fresh, w, packed, out=spare)]
        took = []
        for call in calls if own_first else calls[::-1]:
            t = time.perf_counter()
            call()
            took.append(time.perf_counter() - t)
        rows.append((own_first, took[0], took[1]))
        pairs.append(n)

    decode_program.run_handoff = timed
    try:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    finally:
        decode_program.run_handoff = orig

    def med(v):
        return float(np.median(v)) * 1e6 if v else None

    out = {
        "calls": len(rows),
        "ram_experts_per_call": float(np.mean(pairs)) if pairs else None,
        "own_first_us": med([a for f, a, _ in rows if f]),
        "fresh_second_us": med([b for f, _, b in rows if f]),
        "fresh_first_us": med([a for f, a, _ in rows if not f]),
        "own_second_us": med([b for f, _, b in rows if not f]),
    }
    print("in-step CPU calls (median us):", {k: round(v, 1) for k, v in out.items() if v is not None})
    return out


def layer_rates(layers: list, calls: int = 300) -> dict:
    """us per one-token call cycling over the model's CPU layers with fresh random RAM experts
    (as many as a step hits), next to the same layers copied to fresh memory and to random layers
    of the same shape made in this process: tells the weights' memory from the process around them."""
    import dataclasses

    import cpu_kernels
    from cpu_kernels.probe import random_layer

    packed = [m.cpu.packed for m in layers if m.cpu is not None]
    if not packed:
        return {}
    p0 = packed[0]
    big = ("gate_up", "down", "gate_up_scale", "down_scale")
    copies = [dataclasses.replace(p, **{f: np.copy(getattr(p, f)) for f in big}) for p in packed]
    randoms = [
        random_layer(p0.fmt, p0.E, p0.H, p0.I, seed=11 * i, g=p0.group_size or 64) for i in range(len(packed))
    ]
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, p0.H), dtype=np.float32)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    out = {"thp": thp.read_text().strip() if thp.exists() else None, "layers": len(packed)}
    for k in (5, 6):
        w = np.full((1, k), 1.0 / k, np.float32)
        y = np.empty_like(x)
        ids = [rng.choice(p0.E, k, replace=False).astype(np.int32)[None] for _ in range(calls)]
        for name, group in (
            ("model", packed),
            ("copy", copies),
            ("random", randoms),
            ("model_again", packed),
        ):
            cpu_kernels.fused_moe(x, ids[0], w, group[0], out=y)
            took = []
            for i in range(calls):
                t = time.perf_counter()
                cpu_kernels.fused_moe(x, ids[i], w, group[i % len(group)], out=y)
                took.append(time.perf_counter() - t)
            out[f"{name}_k{k}_us"] = float(np.median(took)) * 1e6
    with open("/proc/meminfo") as f:
        out["anon_huge_kB"] = next(
            (int(line.split()[1]) for line in f if line.startswith("AnonHugePages")), None
        )
    print("layer rates (median us):", out)
    return out


def handoff_timeline(trace: dict, steps: int) -> dict | None:
    """A decode step's GPU timeline cut at the CPU hand-offs: per hand-off, the GPU segment from the
    copy of the previous CPU result to the device (its first event) to the end of this one's
    staging, and the CPU window after it (until the next host-to-device copy starts).

    Reads the kernels and copies of a Chrome trace of ``steps`` decode steps (torch profiler)."""
    # The kernel spinning on a hand-off's host flag spans the CPU window itself: not GPU work, but
    # its end marks the GPU taking up the CPU's result.
    ev = [
        e
        for e in trace.get("traceEvents", [])
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    if not ev:
        return None
    ev.sort(key=lambda e: e["ts"])
    # A hand-off's inputs reach the host by device-to-host copies, or by one kernel storing into
    # page-locked memory (gpu_kernels.handoff); the host-to-device copy of the result after a
    # run of them starts the next segment.
    d2h = [
        i
        for i, e in enumerate(ev)
        if (e["cat"] == "gpu_memcpy" and "DtoH" in e["name"]) or e["name"].startswith("_stage_kernel")
    ]
    segments, cpu_windows, kernels = [], [], []
    start = 0
    i = 0
    while i < len(d2h):
        j = i
        while j + 1 < len(d2h) and d2h[j + 1] == d2h[j] + 1:
            j += 1
        last = ev[d2h[j]]
        end_us = last["ts"] + last["dur"]
        seg = [e for e in ev[start : d2h[j] + 1] if not _is_wait(e)]
        if seg:
            busy = sum(e["dur"] for e in seg)
            span = end_us - seg[0]["ts"]
            segments.append((span, busy, len(seg)))
            kernels.extend((e["name"], e["dur"]) for e in seg)
        start = max(start, d2h[j] + 1)
        # The end of the next wait on a host flag, or the next host-to-device copy (the CPU result
        # coming back; in a decode graph the next norm may read it in host memory instead), ends
        # the CPU window.
        nxt = next((k for k in range(start, len(ev)) if _is_wait(ev[k]) or "HtoD" in ev[k]["name"]), None)
        if nxt is not None:
            e = ev[nxt]
            waited = _is_wait(e)
            cpu_windows.append(e["ts"] + (e["dur"] if waited else 0) - end_us)
            start = nxt + 1 if waited else nxt
        i = j + 1
    if not segments:
        return None
    n = len(segments)
    count, dur = {}, {}
    for name, d in kernels:
        count[name] = count.get(name, 0) + 1
        dur[name] = dur.get(name, 0.0) + d
    top = sorted(count, key=lambda k: -dur[k])[:40]
    out = {
        "handoffs": n,
        "handoffs_per_step": n / steps,
        "gpu_segment_us": sum(s[0] for s in segments) / n,
        "gpu_segment_busy_us": sum(s[1] for s in segments) / n,
        "gpu_segment_events": sum(s[2] for s in segments) / n,
        "cpu_window_us": sum(cpu_windows) / max(len(cpu_windows), 1),
        "events_per_segment": {k: [count[k] / n, dur[k] / n] for k in top},
    }
    print(
        f"per hand-off: GPU segment {out['gpu_segment_us']:.1f} us ({out['gpu_segment_busy_us']:.1f} us busy, "
        f"{out['gpu_segment_events']:.1f} kernels/copies); CPU window {out['cpu_window_us']:.1f} us"
    )
    print("  count  us  (per segment)")
    for k in top:
        print(f"  {count[k] / n:5.2f} {dur[k] / n:6.2f}  {k[:100]}")
    return out


def _is_wait(e: dict) -> bool:
    return e["name"].startswith("_wait_kernel")


def compare_launch(engine, prompt: list[int], steps: int, reps: int = 3) -> dict:
    """Each way of driving the decode graphs (``hetero.graphs.LAUNCH_MODES``), alternating, ``reps``
    times: the step split of ``replay_times`` per run, and per mode the median step and the median
    time outside the CPU calls (which the CPU kernels' run-to-run spread does not move)."""
    from hetero.graphs import LAUNCH_MODES

    default = engine.graphs.launch
    variants = {m: (lambda m=m: setattr(engine.graphs, "launch", m)) for m in LAUNCH_MODES}
    out = compare(engine, prompt, steps, variants, reps, key="launch")
    engine.graphs.launch = default
    return {"default": default, **out}


def compare_defer(engine, prompt: list[int], steps: int, defers: list[int], reps: int = 3) -> dict:
    """Expert deferral of 0, 1, ... experts a token (``hetero.moe.defer_experts``), alternating, with
    the default launch, as ``compare_launch`` times them; and what each does to the numbers: greedy
    decoding from the same prompt against no deferral, the steps until the first other token and the
    logits' relative difference over them (median and largest)."""
    from hetero.moe import defer_experts

    model = engine.model
    variants = {f"defer{d}": (lambda d=d: defer_experts(model, d)) for d in defers}
    out = compare(engine, prompt, steps, variants, reps, key="variant")
    return {**out, "accuracy": deferral_accuracy(engine, prompt, steps, defers)}


def deferral_accuracy(engine, prompt: list[int], steps: int, defers: list[int]) -> list[dict]:
    """Greedy decoding from ``prompt`` with each deferral against none: the steps until the first other
    token and the logits' relative difference over them (median and largest); deferral off after."""
    from hetero.moe import defer_experts

    model = engine.model
    runs = {}
    full = model.logits
    for d in [0] + [d for d in defers if d]:
        defer_experts(model, d)
        got: list[torch.Tensor] = []
        model.logits = lambda h, got=got: got.append(full(h).float().cpu()) or got[-1]
        try:
            (seq,) = engine.generate(
                [prompt], SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
            )
        finally:
            # the class's method again: an instance attribute holding a bound method would tie the
            # model to itself, a cycle the frozen heap (hetero.engine.settle_heap) never collects
            del model.logits
        runs[d] = (seq.output_ids, got)
    defer_experts(model, 0)
    ref_ids, ref_logits = runs[0]
    accuracy = []
    for d in defers:
        if not d:
            continue
        ids, logits = runs[d]
        same = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), len(ids))
        # logits i (0: the prompt's) choose token i: the same inputs up to the first other token (i <= same)
        rel = [float((a - b).norm() / b.norm()) for a, b in zip(logits[: same + 1], ref_logits[: same + 1])]
        accuracy.append(
            {"defer": d, "same_tokens": same, "of": len(ids), "logits_rel_median": float(np.median(rel)),
             "logits_rel_max": max(rel)}
        )  # fmt: skip
        print(
            f"defer {d}: {same} of {len(ids)} greedy tokens as without; logits differ by {np.median(rel):.3f}"
        )
    return accuracy


TRACED_STEPS = 8  # steps of each compared run traced after its timed ones (kernel_trace)


class TeamHolder:
    """A second team of kernel threads, held alive or let go: a thread that ran a parallel region
    on every core (as bulk work on another thread than the CPU worker's would) and waits."""

    def __init__(self):
        self.thread, self.stop = None, threading.Event()

    def hold(self) -> None:
        if self.thread is not None:
            return
        import numba

        from cpu_kernels.probe import _random

        started = threading.Event()

        def run():
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
            _random((1 << 20,), np.uint8, 1)  # one parallel region
            started.set()
            self.stop.wait()

        self.stop.clear()
        self.thread = threading.Thread(target=run, name="second-team")
        self.thread.start()
        started.wait()

    def release(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()  # the thread ends, and libgomp frees its pool
            self.thread = None


def compare(engine, prompt: list[int], steps: int, variants: dict, reps: int, key: str) -> dict:
    """Each variant (name -> a function that sets it up), alternating ``reps`` times: the step split of
    ``replay_times`` per run, then TRACED_STEPS steps' CPU calls traced (``kernel_trace``), and per
    variant the median step, time outside the CPU calls and in them, a CPU call's part from its
    inputs to its output whole and the gap from one call's output to the next one's inputs."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    traces: dict[str, list[dict]] = {v: [] for v in variants}
    for setup in variants.values():  # each variant's first steps (flags, the worker's threads) untimed
        setup()
        engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        if engine.graphs.failed:
            raise SystemExit(f"decode steps ran eagerly: {engine.graphs.failed}")
    for _ in range(reps):
        for name, setup in variants.items():
            setup()
            seq = engine.add_request(
                prompt, SamplingParams(max_tokens=steps + TRACED_STEPS + 4, temperature=0, ignore_eos=True)
            )
            while len(seq.output_ids) < 2:  # one decode step first: a mode may capture its graphs anew
                engine.step()
            runs[name].append(replay_times(engine, steps)["step_split_ms"])
            traces[name].append(kernel_trace(engine, TRACED_STEPS))
            while not seq.finished:
                engine.step()
    table = [
        {
            key: v,
            "step_ms": float(np.median([r["step"] for r in rs])),
            "outside_cpu_calls_ms": float(np.median([r["outside_cpu_calls"] for r in rs])),
            "cpu_calls_ms": float(np.median([r["replay_cpu_calls"] for r in rs])),
            **{
                f"{k}_ms": float(np.median([r.get(k, 0.0) for r in rs]))
                for k in ("sample", "load", "step_rest")
            },
            **{
                k: float(np.median([t[k] for t in traces[v] if k in t]))
                if any(k in t for t in traces[v])
                else None
                for k in ("out_us", "gap_us")
            },
        }
        for v, rs in runs.items()
    ]
    print(
        f"{key:>10} {'step ms':>8} {'outside CPU calls':>18} {'CPU calls':>10} {'sample':>7} {'load':>6} {'rest':>6}"
        f" {'call us':>8} {'gap us':>7}"
    )

    def fmt(v: float | None, w: int) -> str:
        return f"{v:{w}.1f}" if v is not None else f"{'-':>{w}}"

    for t in table:
        print(
            f"{t[key]:>10} {t['step_ms']:8.2f} {t['outside_cpu_calls_ms']:18.2f} {t['cpu_calls_ms']:10.2f}"
            f" {t['sample_ms']:7.2f} {t['load_ms']:6.2f} {t['step_rest_ms']:6.2f} {fmt(t['out_us'], 8)}"
            f" {fmt(t['gap_us'], 7)}"
        )
    return {"medians": table, "runs": runs, "traces": traces}


# A kernel's switch: (module, the largest batch it runs) and its name against what it replaced;
# "inputs": attention's input projections as one product (hetero.layers.FusedLinear) or apart
FUSED = {
    "router": ("gpu_kernels.router", "ROUTE_MAX_TOKENS", ("one_kernel", "gemm")),
    "absorb": ("gpu_kernels.mla_attention", "ABSORB_MAX_TOKENS", ("one_kernel", "bmm")),
    "inputs": (None, None, ("fused", "apart")),
    # the CPU experts' output brought back by a kernel node against the copy engine's node
    "fetch": ("gpu_kernels.handoff", "FETCH_MAX_BYTES", ("kernel", "copy_engine")),
    # the decode chain's kernels under programmatic dependent launch, or one after another
    "chain": ("gpu_kernels._triton", "CHAIN_PDL", ("chain", "plain")),
    # plain CPU hand-offs as calls prepared once, or through fused_moe's checks every call
    "prepared": ("hetero.decode_program", "PREPARED_CALLS", ("prepared", "fused_moe")),
    # split-K GEMV partial sums added by the kernel after the product (rotary, add + norm), or by
    # a sum kernel of their own
    "unsummed": ("hetero.layers", "UNSUMMED", ("unsummed", "summed")),
}
FUSED_ON = {"fetch": 1 << 20}  # the setting on, where the shipped one is off


def compare_kernel(engine, prompt: list[int], steps: int, name: str) -> dict:
    """A decode-size kernel (FUSED) on against off (its batch limit 0, or the projections apart),
    alternating; each setting's captured steps are kept alive (all share one memory pool), captured
    on first use."""
    import importlib

    module_name, attr, (on, off) = FUSED[name]
    if module_name is None:
        attns = [m for m in engine.model.modules() if getattr(m, "fused", None) is not None]
        fused = [a.fused for a in attns]

        def apply(value: bool) -> None:
            for a, f in zip(attns, fused):
                a.fused = f if value else None

        values, state = (True, False), {"now": True}
    else:
        module = importlib.import_module(module_name)

        def apply(value: int) -> None:
            setattr(module, attr, value)

        values, state = (FUSED_ON.get(name, getattr(module, attr)), 0), {"now": getattr(module, attr)}
    sets: dict = {}

    def setting(value):
        def setup():
            if state["now"] != value:
                sets[state["now"]] = engine.graphs._entries
                apply(value)
                state["now"] = value
                engine.graphs._entries = sets.get(value, {})

        return setup

    row = compare(engine, prompt, steps, {on: setting(values[0]), off: setting(values[1])}, 3, key="variant")
    setting(values[0])()
    return row


def host_profile(engine, prompt: list[int], steps: int) -> None:
    """Decode ``steps`` tokens under cProfile and print the host's time by function, own and cumulative."""
    import cProfile
    import pstats

    seq = engine.add_request(prompt, SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
    engine.step()  # the prompt
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    while not seq.finished:
        engine.step()
    prof.disable()
    print(f"{(time.perf_counter() - t) / steps * 1e3:.2f} ms a step under cProfile")
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumtime").print_stats(40)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gpu-mem", default="6GiB")
    ap.add_argument("--experts", default="int4")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--trace", default=None, help="write the profiled steps' Chrome trace here")
    ap.add_argument(
        "--defer", type=int, default=0, help="defer each token's N lightest experts to the next layer"
    )
    ap.add_argument("--launch", default=None, help="how the host drives the decode graphs (hetero.graphs)")
    ap.add_argument(
        "--cpu-threads", type=int, default=0, help="threads of the CPU expert kernels (0: default)"
    )
    ap.add_argument(
        "--compare-launch", action="store_true", help="only time each way of driving the graphs, alternating"
    )
    ap.add_argument(
        "--compare-threads",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="only time the CPU expert kernels on each N threads, alternating (with --defer as given)",
    )
    ap.add_argument(
        "--compare-knob",
        nargs="+",
        default=None,
        metavar="NAME_OR_VALUE",
        help="only time the CPU expert kernels with a work-item setting (cpu_kernels.moe.set_knobs: "
        "e.g. decode_quant_blocks 1 4) at each value, alternating",
    )
    ap.add_argument(
        "--compare-early",
        action="store_true",
        help="only time CPU expert calls made ahead of their inputs (waiting on the staging's flag) "
        "against calls made once the staging's event is done, alternating (hetero.graphs.early_calls)",
    )
    ap.add_argument(
        "--compare-overlap",
        action="store_true",
        help="only time greedy steps launched one ahead, their CPU experts on the worker thread "
        "(EngineConfig.overlap), on the kernels' threads and on one more (one fewer on all cores), "
        "against steps run one at a time, alternating",
    )
    ap.add_argument(
        "--compare-teams",
        action="store_true",
        help="only time steps whose CPU worker's team of kernel threads is the only one against steps "
        "with a second team alive (a thread that ran a parallel region on every core and waits), "
        "alternating: what a second pool of workers costs the decode calls (cpu_kernels.threads)",
    )
    ap.add_argument(
        "--compare-sample",
        action="store_true",
        help="only time greedy tokens picked inside the decode graphs against logits and argmax run "
        "by the host after the step, alternating (hetero.graphs.sample_greedy)",
    )
    ap.add_argument(
        "--compare-kernel",
        choices=sorted(FUSED),
        default=None,
        help="only time a decode-size kernel against what it replaced, alternating (each with graphs "
        "captured for it): router (gpu_kernels.router.route_experts against a GEMM for the logits and "
        "a choosing kernel), absorb (gpu_kernels.mla_attention.absorb against batched GEMMs), fetch (the CPU "
        "experts' output read back by a kernel against the copy engine's copy), chain (the decode chain "
        "under dependent launch against plain launches), prepared (plain CPU hand-offs as calls prepared "
        "once against fused_moe every call), unsummed (split-K partial sums added by the next kernel "
        "against a sum kernel of their own)",
    )
    ap.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="N",
        help="only run N decode steps under cProfile: the host's Python, by function (no CUDA profiler)",
    )
    ap.add_argument(
        "--compare-defer",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="only time expert deferral of each N experts a token, alternating, and its effect on the logits",
    )
    ap.add_argument(
        "--compare-share",
        type=float,
        nargs="+",
        default=None,
        metavar="S",
        help="only time each PCIe share S (of a step's RAM experts, gathered by the GPU), alternating",
    )
    ap.add_argument(
        "--pcie-share", type=float, default=0.0, help="share of a step's RAM experts the GPU reads over PCIe"
    )
    args = ap.parse_args(argv)
    cap = parse_size(args.gpu_mem)
    cap_device_memory(cap)
    # PCIe experts are set up at load when a share is asked for; the graphs then read the share
    share = max(args.compare_share) if args.compare_share else args.pcie_share
    opts = RuntimeOptions(
        offload=True,
        gpu_mem=cap - (1 << 30),
        experts=args.experts,
        max_batch=1,
        max_model_len=1024,
        pcie_share=share,
    )
    rt = load_runtime(args.model, opts)
    if args.cpu_threads:
        import cpu_kernels

        cpu_kernels.set_num_threads(args.cpu_threads)
    if args.defer:
        from hetero.moe import defer_experts

        defer_experts(rt.engine.model, args.defer)
    engine = rt.engine
    if args.launch and engine.graphs is not None:
        engine.graphs.launch = args.launch
    prompt = list(range(1000, 1064))
    engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    if args.host_profile:
        host_profile(engine, prompt, args.host_profile)
        return 0
    switches = {"early_calls": args.compare_early, "sample_greedy": args.compare_sample}
    switch = next((name for name, on in switches.items() if on), None)
    comparing = (
        args.compare_defer
        or args.compare_threads
        or args.compare_kernel
        or args.compare_share
        or args.compare_overlap
        or args.compare_teams
        or args.compare_knob
    )
    if args.compare_launch or comparing or switch:
        if engine.graphs is None or not torch.cuda.is_available():
            raise SystemExit("--compare-* need CUDA graphs")
        if args.compare_defer:
            row = compare_defer(engine, prompt, args.steps, args.compare_defer)
        elif args.compare_kernel:
            row = compare_kernel(engine, prompt, args.steps, args.compare_kernel)
        elif switch:  # a switch of the decode graphs, on against off
            graphs = engine.graphs
            names = {"early_calls": ("early", "after_event"), "sample_greedy": ("device", "host")}[switch]
            variants = {
                names[0]: lambda: setattr(graphs, switch, True),
                names[1]: lambda: setattr(graphs, switch, False),
            }
            row = compare(engine, prompt, args.steps, variants, 3, key="variant")
            setattr(graphs, switch, True)
        elif args.compare_threads:
            import cpu_kernels

            variants = {
                f"threads{n}": (lambda n=n: cpu_kernels.set_num_threads(n)) for n in args.compare_threads
            }
            row = compare(engine, prompt, args.steps, variants, 3, key="variant")
        elif args.compare_overlap:
            import cpu_kernels

            n = cpu_kernels.get_num_threads()

            def setup(overlap: bool, threads: int):
                engine.config.overlap = overlap
                cpu_kernels.set_num_threads(threads)

            # and on one thread fewer (one more where the kernels leave a core), a core for the host
            other = n - 1 if n >= (os.cpu_count() or n) else n + 1
            variants = {
                "one_at_a_time": lambda: setup(False, n),
                "overlap": lambda: setup(True, n),
                f"overlap_{other}thr": lambda: setup(True, other),
            }
            row = compare(engine, prompt, args.steps, variants, 3, key="variant")
            setup(True, n)
        elif args.compare_knob:
            from cpu_kernels import moe

            knob, values = args.compare_knob[0], [int(v) for v in args.compare_knob[1:]]
            shapes = {
                (m.cpu.packed.fmt, m.cpu.packed.H, m.cpu.packed.I)
                for m in engine.model.modules()
                if isinstance(m, HybridExperts) and hasattr(m.cpu, "packed")
            }

            def set_knob(value: int) -> None:
                for fmt, H, I in shapes:  # noqa: E741
                    moe.set_knobs(fmt, H, I, **{knob: value})

            variants = {f"{knob}={v}": (lambda v=v: set_knob(v)) for v in values}
            row = compare(engine, prompt, args.steps, variants, 3, key="variant")
        elif args.compare_teams:
            holder = TeamHolder()
            variants = {"one_team": holder.release, "two_teams": holder.hold}
            row = compare(engine, prompt, args.steps, variants, 3, key="variant")
            holder.release()
        elif args.compare_share:
            from hetero.experts import set_pcie_share

            variants = {
                f"share{s:g}": (lambda s=s: set_pcie_share(engine.model, s)) for s in args.compare_share
            }
            row = compare(engine, prompt, args.steps, variants, 3, key="variant")
        else:
            row = compare_launch(engine, prompt, args.steps)
        from cpu_kernels.cpu_info import machine_name
        from placement import detect

        row["machine"] = f"{torch.cuda.get_device_name(0)} + {machine_name()}"
        # the decode roofline of e2e.py: RAM expert bytes a token reads at the probed read bandwidth
        cpu_bw = detect().cpu_read_bw
        roof = cpu_bw / ram_expert_bytes_per_token(engine.model, rt.spec.top_k)
        row.update(defer=args.defer, cpu_read_bw_GBs=cpu_bw / 1e9, decode_roofline_tok_s=roof)
        for t in row["medians"]:
            t["over_roofline"] = 1e3 / t["step_ms"] / roof
            name = t.get("launch", t.get("variant"))
            print(f"{name:>10}: {1e3 / t['step_ms']:.1f} tok/s, {t['over_roofline']:.2f} of the roofline")
        name = Path(args.model).name + (f"-defer{args.defer}" if args.defer else "")
        gpu = torch.cuda.get_device_name(0).replace(" ", "_")
        kind = (
            "decode_defer"
            if args.compare_defer
            else "decode_threads"
            if args.compare_threads
            else "decode_pcie_share"
            if args.compare_share
            else "decode_teams"
            if args.compare_teams
            else f"decode_knob_{args.compare_knob[0]}"
            if args.compare_knob
            else "decode_overlap"
            if args.compare_overlap
            else "decode_early"
            if args.compare_early
            else "decode_sample"
            if args.compare_sample
            else f"decode_{args.compare_kernel}"
            if args.compare_kernel
            else "decode_launch"
        )
        out = RESULTS / f"{kind}-{name}-{args.experts}-{gpu}.json"
        out.write_text(json.dumps(row, indent=2))
        print(f"wrote {out}")
        return 0
    seq = engine.add_request(
        prompt, SamplingParams(max_tokens=4 * args.steps + 4, temperature=0, ignore_eos=True)
    )
    while not seq.output_ids:
        engine.step()
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    )
    replays = replay_times(engine, args.steps) if cuda else None
    kernel = kernel_trace(engine, args.steps) if cuda else None
    diagnosis = in_step_calls(engine, args.steps) if cuda else None
    rates = layer_rates(
        [
            m.mlp.experts
            for m in engine.model.model.layers
            if isinstance(getattr(m.mlp, "experts", None), HybridExperts)
        ]
    )
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        if cuda:
            torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t) / args.steps * 1e3
    averages = prof.key_averages()
    timeline = None
    if cuda:
        path = args.trace or f"/tmp/decode_profile-{args.experts}.json"
        prof.export_chrome_trace(path)
        timeline = handoff_timeline(json.loads(Path(path).read_text()), args.steps)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
    if cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=20))
    layers = [
        m.mlp.experts
        for m in engine.model.model.layers
        if isinstance(getattr(m.mlp, "experts", None), HybridExperts)
    ]
    cpu = time_cpu_layer(layers[0], rt.spec.hidden_size, rt.spec.top_k) if layers and layers[0].cpu else {}
    timings = engine.model.worker.timings
    row = {
        "decode_step_ms": step_ms,
        "moe_layers": len(layers),
        "cpu_layer_main_ms": cpu.get("main_thread_ms"),
        "cpu_layer_worker_ms": cpu.get("worker_thread_ms"),
        "cpu_layer_GBs": cpu.get("bytes", 0) / (cpu.get("main_thread_ms") or 1) / 1e6,
        "engine_cpu_experts_ms_per_step": timings.cpu_experts / max(timings.calls, 1) * len(layers) * 1e3,
        "engine_wait_ms_per_step": timings.wait * 1e3 / (args.steps + 10),
    }
    if timeline:
        row["timeline"] = timeline
    if replays:
        row["replays"] = replays
    if kernel:
        row["kernel_trace"] = kernel
    if diagnosis:
        row["in_step_calls"] = diagnosis
    if rates:
        row["layer_rates"] = rates
    RESULTS.mkdir(exist_ok=True)
    name = Path(args.model).name
    gpu = torch.cuda.get_device_name(0).replace(" ", "_") if cuda else "cpu"
    tag = (
        (f"-{args.launch}" if args.launch else "")
        + (f"-t{args.cpu_threads}" if args.cpu_threads else "")
        + (f"-defer{args.defer}" if args.defer else "")
    )
    (RESULTS / f"decode_profile-{name}-{args.experts}{tag}-{gpu}.json").write_text(json.dumps(row, indent=2))
    print("\n".join(f"{k:34s} {v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
