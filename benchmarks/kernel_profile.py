"""Hardware counters of the decode-size GPU kernels at one row, under Nsight Compute (ncu): how much of the
DRAM peak each kernel draws over its run, how many of its programs fit on an SM and what limits them,
how long the SMs sit idle while it runs (a grid that ends unevenly, a ramp), and how often its warps
issue. The timed benchmarks (gpu_kernels.py) give the graph times the targets are about; this shows why
they are what they are.

    python benchmarks/kernel_profile.py [--only moe,gqa,mla] [--rows N] [--ncu PATH]

Runs itself under ncu (``--child``) on the shipped launch settings: the fused-MoE GEMV kernels (int4,
V2-Lite and Qwen3-30B-A3B experts), GQA decode over bf16 and int8 caches and 16-head MLA decode at 32k
context (--rows: that many rows of attention, one by default). Each row also names the reasons its warps
stalled most, as cycles per issued instruction. Prints a table last and writes kernel_profile-<machine>.json.

ncu runs each kernel alone, with the L2 flushed before it and the clocks left as the driver sets them
(``--clock-control none``: a graph's ~2 GHz, not the ~1.6 GHz base that ncu locks by default), and kernels
that a graph overlaps (programmatic dependent launch) run one after the other here, so durations are
longer than the graph's.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from common import format_table, gpu_name, machine_name, write_json  # noqa: E402

SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats")
# column: (ncu metric name, how to read it)
METRICS = {
    "us": ("Duration", lambda v: v / 1e3),  # ns
    "dram_pct": ("DRAM Throughput", float),
    "sm_active_pct": None,  # SM Active Cycles / Elapsed Cycles
    "grid": ("Grid Size", int),
    "block": ("Block Size", int),
    "regs": ("Registers Per Thread", int),
    "smem_KB": ("Dynamic Shared Memory Per Block", lambda v: round(v / 1024, 1)),
    "per_sm_regs": ("Block Limit Registers", int),
    "per_sm_smem": ("Block Limit Shared Mem", int),
    "waves": ("Waves Per SM", float),
    "occupancy_pct": ("Achieved Occupancy", float),
    "issue_per_sched": ("Issued Warp Per Scheduler", float),
    "cycles_per_issue": ("Warp Cycles Per Issued Instruction", float),
    "l2_hit_pct": ("L2 Hit Rate", float),
}
STALLS = (  # warp stall reasons (ncu's names), each as cycles a warp spent on it per issued instruction
    "long_scoreboard short_scoreboard mio_throttle lg_throttle barrier wait math_pipe_throttle not_selected"
    " no_instruction dispatch_stall membar sleeping drain branch_resolving misc imc_miss tex_throttle"
).split()
STALL_METRIC = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"


def child(only: list[str], rows: int) -> None:
    """Build each case's inputs, warm its kernels up, then run each once between profiler start / stop."""
    import importlib.util

    import torch

    from gpu_kernels import moe
    from gpu_kernels.mla_attention import mla_decode_attention_triton
    from gpu_kernels.paged_attention import paged_decode_attention_triton

    spec = importlib.util.spec_from_file_location("kernel_bench", Path(__file__).with_name("gpu_kernels.py"))
    kb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kb)
    runs = []
    if "moe" in only:
        for E, H, inter, K in kb.MOE_SHAPES.values():
            w13, w2 = kb.moe_weights(E, H, inter, "int4")
            x = torch.randn(1, H, device="cuda").bfloat16()
            ids = torch.randperm(E, device="cuda")[:K].view(1, K).int()
            wts = torch.rand(1, K, device="cuda")
            runs.append(lambda a=(x, w13, w2, ids, wts): moe.fused_moe_triton(*a))
    if "gqa" in only:
        for cache in ("bf16", "int8"):
            (args, kw), *_ = kb.gqa_calls(cache, 32768, rows)[0]
            runs.append(lambda a=args, k=kw: paged_decode_attention_triton(*a, **k))
    if "mla" in only:
        (args, kw), *_ = kb.mla_calls(16, 32768, rows)[0]
        runs.append(lambda a=args, k=kw: mla_decode_attention_triton(*a, **k))
    for run in runs:
        for _ in range(3):
            run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


CASES = {  # what each kernel launch belongs to, in the child's order
    "moe": ["MoE V2-Lite int4"] * 3 + ["MoE Qwen3-30B-A3B int4"] * 3,
    "gqa": ["GQA bf16 32k"] * 2 + ["GQA int8 32k"] * 2,
    "mla": ["MLA 16 heads 32k"] * 2,
}


def parse(text: str, only: list[str], rows_n: int = 1) -> list[dict]:
    """ncu's --csv --page details output -> one row per kernel launch."""
    table = list(csv.DictReader(io.StringIO(text[text.index('"ID"') :])))
    launches: dict[str, dict] = {}
    for r in table:
        got = launches.setdefault(r["ID"], {"kernel": r["Kernel Name"].split("(")[0], "m": {}})
        got["m"][r["Metric Name"]] = r["Metric Value"].replace(",", "")
    suffix = {k: f" N={rows_n}" if k != "moe" and rows_n != 1 else "" for k in CASES}
    names = [c + suffix[k] for k in ("moe", "gqa", "mla") if k in only for c in CASES[k]]
    rows = []
    for i, (_, got) in enumerate(sorted(launches.items(), key=lambda kv: int(kv[0]))):
        m = got["m"]
        row = {"case": names[i] if i < len(names) else "", "kernel": got["kernel"].lstrip("_")}
        for col, spec in METRICS.items():
            if spec is None:
                elapsed, active = float(m["Elapsed Cycles"]), float(m["SM Active Cycles"])
                row[col] = round(100 * active / elapsed, 1)
            elif spec[0] in m:
                row[col] = round(spec[1](float(m[spec[0]])), 2)
        stalls = {r: float(m[STALL_METRIC.format(r)]) for r in STALLS if STALL_METRIC.format(r) in m}
        top = sorted(stalls.items(), key=lambda kv: -kv[1])[:3]
        row["top_stalls"] = " ".join(f"{r}:{v:.1f}" for r, v in top)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="moe,gqa,mla")
    ap.add_argument("--rows", type=int, default=1, help="attention rows (decode batch)")
    ap.add_argument("--ncu", default=shutil.which("ncu") or "/usr/local/cuda/bin/ncu")
    ap.add_argument("--out", default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    only = args.only.split(",")
    if args.child:
        child(only, args.rows)
        return
    if not os.path.exists(args.ncu):
        raise SystemExit(f"ncu not found at {args.ncu}: install Nsight Compute or pass --ncu PATH")
    cmd = [args.ncu, "--profile-from-start", "off", "--csv", "--page", "details", "--print-units", "base"]
    cmd += ["--clock-control", "none"]
    cmd += [a for s in SECTIONS for a in ("--section", s)]
    cmd += ["--metrics", ",".join(STALL_METRIC.format(r) for r in STALLS)]
    cmd += [sys.executable, __file__, "--child", "--only", args.only, "--rows", str(args.rows)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or '"ID"' not in done.stdout:
        raise SystemExit(f"ncu failed ({done.returncode}):\n{done.stderr[-2000:]}")
    rows = parse(done.stdout, only, args.rows)
    card = gpu_name() or "gpu"
    data = {"machine": machine_name(), "gpu": card, "ncu": "clocks not locked, L2 flushed per kernel"}
    stem = "kernel_profile-" + re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    stem += f"-rows{args.rows}" if args.rows != 1 else ""
    path = write_json(stem, {**data, "rows": rows}, Path(args.out) if args.out else None)
    print(f"{card}, under ncu ({data['ncu']}); wrote {path}")
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
