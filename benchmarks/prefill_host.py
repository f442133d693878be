"""Streamed prefill: is the PCIe link or the host the bound? Variants side by side in one process.

    python benchmarks/prefill_host.py MODEL_DIR --gpu-mem 10GiB [--experts int4] [--compare align]

A streamed prefill keeps the link busy only while the host issues each layer's copies ahead of
it; when the host's own work for a layer (launching attention, routing, each chunk's unpack and
expert kernels) takes longer than the layer's copies, the link waits. Per variant, alternating:
prefill tokens/s of a ``--prefill-len`` prompt (best of ``--reps``) against the bound e2e.py
reports (per layer the faster of streaming and the CPU), then one profiled prefill whose trace
gives the copies' busy time, how long the link sat idle until the host issued the next copy, and the
host operations with the most self time.

``--compare align``: the sorted path's expert sort by the Triton kernels (moe_align_block_size's
default on CUDA) against its torch operations. Prints a table last; writes JSON under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path

# benchmarks/gpu_kernels.py would shadow the gpu_kernels package for scripts run from here.
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import gpu_kernels.moe as moe  # noqa: E402
from hetero.bench import run_bench  # noqa: E402
from hetero.runtime import RuntimeOptions, load_runtime  # noqa: E402
from hetero.sampling import SamplingParams  # noqa: E402
from placement import detect  # noqa: E402
from placement.units import parse_size  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HOST_TOP = 15  # the host operations with the most self time in a profiled prefill, reported per variant


def _e2e():
    spec = importlib.util.spec_from_file_location("e2e", Path(__file__).with_name("e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def variants(what: str) -> dict:
    """name -> a context manager under which the engine runs that variant of one comparison."""
    if what == "align":
        orig = moe.moe_align_block_size

        def torch_align(ids, bs, num_experts, kernel=None):
            return orig(ids, bs, num_experts, kernel=False)

        @contextlib.contextmanager
        def use(fn):
            moe.moe_align_block_size = fn
            try:
                yield
            finally:
                moe.moe_align_block_size = orig

        return {"kernel": lambda: use(orig), "torch": lambda: use(torch_align)}
    raise SystemExit(f"--compare: unknown comparison {what!r} (align)")


def link_timeline(events: list) -> dict:
    """From a profiled prefill's trace events: the host-to-device copies' busy time, the time the
    link sat idle between them, and the part of that idle time before the host issued the next copy."""
    issued = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            issued[e["args"]["correlation"]] = e["ts"] + e.get("dur", 0)
    copies = sorted(
        (e for e in events if e.get("cat") == "gpu_memcpy" and "Pinned" in e.get("name", "")),
        key=lambda e: e["ts"],
    )
    if not copies:
        return {}
    busy = idle = host_late = 0.0
    end = None
    for e in copies:
        start = e["ts"]
        if end is not None and start > end:
            idle += start - end
            at = issued.get(e["args"].get("correlation"))
            if at is not None:
                host_late += min(start - end, max(0.0, at - end))
        busy += e.get("dur", 0)
        end = start + e.get("dur", 0) if end is None else max(end, start + e.get("dur", 0))
    span = end - copies[0]["ts"]
    return {
        "copies_span_ms": span / 1e3,
        "copies_busy_ms": busy / 1e3,
        "link_idle_ms": idle / 1e3,
        "link_idle_host_late_ms": host_late / 1e3,
    }


def profiled_prefill(rt, tokens: int, seed: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(seed)
    vocab = min(rt.spec.vocab_size, rt.tokenizer.vocab_size)
    seq = rt.engine.add_request(
        torch.randint(0, vocab, (tokens,), generator=g).tolist(),
        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
    )
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        while not seq.finished:
            rt.engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    path = Path(f"/tmp/prefill_host-{seed}.json")
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    path.unlink()
    ops = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:HOST_TOP]
    host = {a.key: [round(a.self_cpu_time_total / 1e3, 2), a.count] for a in ops}
    return {"profiled_wall_ms": wall * 1e3, **link_timeline(events), "host_self_ms_calls": host}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gpu-mem", default="10GiB")
    ap.add_argument("--experts", default="int4")
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compare", default="align")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("prefill_host.py measures streamed prefill on a CUDA device; none is present")
    prof = detect()
    opts = RuntimeOptions(
        offload=True,
        gpu_mem=parse_size(args.gpu_mem) - (1 << 30),  # as e2e.py: headroom for chunks and the allocator
        experts=args.experts,
        max_batch=1,
        max_model_len=args.prefill_len + 32,
        max_step_tokens=args.prefill_len,
        prefix_caching=False,
    )
    rt = load_runtime(args.model, opts)
    e2e = _e2e()
    bound = args.prefill_len / e2e.prefill_bound_s(
        rt.engine.model, rt.spec, args.prefill_len, e2e.bound_rates(prof)
    )
    run_bench(rt, args.prefill_len, 2, 1, seed=1)  # one-time costs of the shape, untimed
    switches = variants(args.compare)
    names = list(switches)
    runs = {n: [] for n in names}
    for rep in range(args.reps):  # alternating, each order in turn
        for n in names if rep % 2 == 0 else names[::-1]:
            with switches[n]():
                runs[n].append(run_bench(rt, args.prefill_len, 2, 1, seed=2 + rep).prefill_tok_s)
            print(f"rep {rep} {n}: {runs[n][-1]:.0f} tok/s", flush=True)
    rows = []
    for k, n in enumerate(names):
        with switches[n]():
            timeline = profiled_prefill(rt, args.prefill_len, 100 + k)
        best = max(runs[n])
        rows.append({"variant": n, "prefill_tok_s": runs[n], "best_over_bound": best / bound, **timeline})
    gpu = torch.cuda.get_device_name(0)
    result = {
        "machine": {"gpu": gpu, "cpu": prof.cpu_model, "cores": prof.physical_cores},
        "model": Path(args.model).name,
        "experts": args.experts,
        "gpu_mem": args.gpu_mem,
        "prefill_len": args.prefill_len,
        "compare": args.compare,
        "bound_tok_s": bound,
        "pcie_pinned_GBs": prof.h2d_pinned_bw / 1e9,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    out = RESULTS / f"prefill_host-{args.compare}-{Path(args.model).name}{tag}-{gpu.replace(' ', '_')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    print(
        f"{gpu}, {prof.cpu_model}; bound {bound:.0f} tok/s (streamed at {prof.h2d_pinned_bw / 1e9:.1f} GB/s)"
    )
    print(
        "variant   prefill tok/s (runs)        best/bound  profiled ms  copies busy  link idle  idle, host late"
    )
    for r in rows:
        top = ", ".join(f"{k} {ms:.1f} ms/{n}" for k, (ms, n) in list(r["host_self_ms_calls"].items())[:8])
        print(f"{r['variant']} host self time (ms / calls): {top}")
    for r in rows:
        runs_s = " ".join(f"{v:.0f}" for v in r["prefill_tok_s"])
        print(
            f"{r['variant']:<9} {runs_s:<27} {r['best_over_bound']:>10.2f} {r['profiled_wall_ms']:>12.1f}"
            f" {r.get('copies_busy_ms', 0):>12.1f} {r.get('link_idle_ms', 0):>10.1f}"
            f" {r.get('link_idle_host_late_ms', 0):>16.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
