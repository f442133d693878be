"""Launch-setting sweep for the fused-MoE GEMV path at decode sizes (gpu_kernels.moe_gemv.fused_moe_gemv).

For V2-Lite and Qwen3-30B-A3B expert shapes, bf16 / int8 / int4 (group 128) / fp8 weights (fp8 where the
card has it) and T = 1 and 4 tokens, every GEMV candidate of gpu_kernels.py's moe_candidates is checked
once against moe.fused_moe_reference and timed as one CUDA-graph replay (median of do_bench, which flushes
L2 between replays), as a share of the device copy bandwidth over the bytes of the experts touched
(gpu_kernels.py's moe_bytes).

Run on a CUDA machine: python benchmarks/moe_gemv_sweep.py [--out FILE] [--T 1 4] [--fmts bf16 int4]
Prints the best three configs per case and a summary table last; writes every timing as JSON.
Kernels are compiled ahead in --jobs worker processes (Triton's on-disk cache then serves this one).
The JSON's tuned_configs holds the fastest config per case: benchmarks/gpu_kernels.py --save-configs FILE
stores them in gpu_kernels/configs/fused_moe_gemv.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this file's folder leads sys.path and gpu_kernels.py there would shadow the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for gpu_kernels

import torch  # noqa: E402
import triton  # noqa: E402

from gpu_kernels import moe, moe_gemv, quant  # noqa: E402

_spec = importlib.util.spec_from_file_location("kernel_bench", Path(__file__).with_name("gpu_kernels.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

DEV = "cuda"
FORMATS = ("bf16", "int8", "int4", "fp8")


def gemv_candidates(T: int, K: int, fmt: str) -> list[dict]:
    """The GEMV configs (those without BLOCK_M) of gpu_kernels.py's moe_candidates."""
    return [cfg for cfg in bench.moe_candidates(T, K, fmt) if "BLOCK_M" not in cfg]


def graph_us(fn, rep: int) -> float:
    """Median microseconds of one CUDA-graph replay of fn() (a capture failure raises)."""
    return 1e3 * bench.bench_ms(bench.capture_graph(fn, [((), {})]).replay, rep=rep)


def routed(E: int, K: int, T: int, H: int, seed: int):
    """x [T, H] bf16, K distinct experts per token, routing weights [T, K]."""
    gen = torch.Generator(DEV).manual_seed(seed)
    x = torch.randn(T, H, generator=gen, device=DEV).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=gen, device=DEV)[:K] for _ in range(T)]).int()
    return x, ids, torch.rand(T, K, generator=gen, device=DEV)


def formats(requested: list[str]) -> list[str]:
    return [f for f in requested if f != "fp8" or quant.fp8_supported(torch.device(DEV))]


# ---------------------------------------------------------------- compile ahead, in worker processes


def compile_worker(task_file: str, worker: int, jobs: int) -> None:
    """Run each config of this worker's share once at T=1 on K experts' weights: that compiles its
    kernels into Triton's on-disk cache, where the timing process finds them."""
    weights = {}
    for shape, fmt, cfg in json.loads(Path(task_file).read_text())[worker::jobs]:
        E, H, inter, K = bench.MOE_SHAPES[shape]
        if (shape, fmt) not in weights:
            weights.clear()  # K experts: the kernels and their specializations are those of E
            weights[(shape, fmt)] = bench.moe_weights(K, H, inter, fmt)
        x, ids, wts = routed(K, K, 1, H, 0)
        try:
            moe_gemv.fused_moe_gemv(x, *weights[(shape, fmt)], ids, wts, cfg)
            torch.cuda.synchronize()
        except Exception as err:  # reported again, with the config, when the timing process runs it
            print(f"compile failed: {shape} {fmt} {cfg}: {err!r}"[:400], flush=True)


def compile_ahead(cases: list[tuple], candidates_of, jobs: int) -> None:
    tasks, seen = [], set()
    for shape, fmt, T in cases:
        for cfg in candidates_of(T, bench.MOE_SHAPES[shape][3], fmt):
            key = (shape, fmt, json.dumps(cfg, sort_keys=True))
            if key not in seen:
                seen.add(key)
                tasks.append((shape, fmt, cfg))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        task_file = Path(tmp) / "tasks.json"
        task_file.write_text(json.dumps(tasks))
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--compile",
            str(task_file),
            "--jobs",
            str(jobs),
        ]
        procs = [
            subprocess.Popen(
                [*cmd, "--worker", str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for i in range(jobs)
        ]
        for proc in procs:
            out, _ = proc.communicate()
            failed = [line for line in out.splitlines() if line.startswith("compile failed")]
            if proc.returncode or failed:
                print("\n".join(failed) or out[-2000:], flush=True)
    print(
        f"compiled {len(tasks)} configs in {time.perf_counter() - t0:.0f} s with {jobs} workers", flush=True
    )


# ---------------------------------------------------------------- timing


def sweep_case(shape: str, fmt: str, T: int, weights, candidates_of, copy_bw: float, rep: int) -> list[dict]:
    E, H, inter, K = bench.MOE_SHAPES[shape]
    w13, w2 = weights
    x, ids, wts = routed(E, K, T, H, seed=T)
    ref = moe.fused_moe_reference(x.float(), w13, w2, ids, wts)
    nbytes = bench.moe_bytes(w13, w2, ids)
    rows = []
    for i, cfg in enumerate(candidates_of(T, K, fmt)):
        row = {"shape": shape, "fmt": fmt, "T": T, "K": K, "bytes": nbytes, "config": cfg, "default": i == 0}
        try:
            out = moe_gemv.fused_moe_gemv(x, w13, w2, ids, wts, cfg).float()
            err = ((out - ref).norm() / ref.norm()).item()
            if cfg.get("DP4A") and fmt in ("int4", "int8"):  # int8-rounded activations: ~1.5% of the norm
                row["ok"] = err < 3e-2
            else:
                row["ok"] = bool(torch.allclose(out, ref, rtol=3e-2, atol=3e-2) and err < 2e-2)
            row["rel_err"] = err
            if not row["ok"]:
                print(f"FAIL {shape} {fmt} T={T} {cfg}: relative error {err:.3e}", flush=True)
            row["us"] = graph_us(lambda c=cfg: moe_gemv.fused_moe_gemv(x, w13, w2, ids, wts, c), rep)
            row["pct_copy"] = 100 * nbytes / (row["us"] * 1e-6) / 1e9 / copy_bw
        except Exception as err:  # one broken config should not cost the rest of the sweep
            print(f"FAIL {shape} {fmt} T={T} {cfg}: {err!r}"[:400], flush=True)
            row.update(ok=False, error=repr(err)[:400], us=float("nan"), pct_copy=float("nan"))
        rows.append(row)
    timed = sorted((r for r in rows if r["ok"]), key=lambda r: r["us"])
    print(f"{shape} {fmt} T={T}: {nbytes / 1e6:.1f} MB, {len(rows)} configs", flush=True)
    for r in timed[:3]:
        print(f"    {r['us']:8.1f} us {r['pct_copy']:5.1f}%  {_short(r['config'])}", flush=True)
    return rows


def _short(cfg: dict) -> str:
    keys = (
        "BLOCK_N",
        "BLOCK_K",
        "SPLIT_K",
        "SPLIT_K2",
        "BLOCK_N2",
        "PDL",
        "num_warps",
        "num_warps2",
        "num_stages",
    )
    return " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def summary(rows: list[dict]) -> None:
    print(f"\n{'shape':14s} {'fmt':5s} {'T':>2s} {'MB':>6s} {'default us':>10s} {'%copy':>6s} "
          f"{'best us':>8s} {'%copy':>6s}  best config")  # fmt: skip
    cases = dict.fromkeys((r["shape"], r["fmt"], r["T"]) for r in rows)
    for case in cases:
        mine = [r for r in rows if (r["shape"], r["fmt"], r["T"]) == case]
        default = next(r for r in mine if r["default"])
        ok = [r for r in mine if r["ok"]]
        best = min(ok, key=lambda r: r["us"]) if ok else default
        print(
            f"{case[0]:14s} {case[1]:5s} {case[2]:2d} {default['bytes'] / 1e6:6.1f} {default['us']:10.1f} "
            f"{default['pct_copy']:6.1f} {best['us']:8.1f} {best['pct_copy']:6.1f}  {_short(best['config'])}"
        )
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(failed)} of {len(rows)} configs failed" if failed else f"all {len(rows)} configs matched")


def run(args, candidates_of=gemv_candidates) -> list[dict]:
    cases = [(s, f, T) for s in args.shapes for f in formats(args.fmts) for T in args.T]
    if args.jobs > 1:
        compile_ahead(cases, candidates_of, args.jobs)
    copy_bw = bench.copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bw:.0f} GB/s", flush=True)
    rows = []
    for shape in args.shapes:
        E, H, inter, K = bench.MOE_SHAPES[shape]
        for fmt in formats(args.fmts):
            weights = bench.moe_weights(E, H, inter, fmt)
            for T in args.T:
                rows += sweep_case(shape, fmt, T, weights, candidates_of, copy_bw, args.rep)
            del weights
    summary(rows)
    card = torch.cuda.get_device_name()
    out = Path(
        args.out or f"benchmarks/results/moe_gemv_sweep-{re.sub(r'[^a-z0-9]+', '-', card.lower())}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tuned = {}  # the fastest matching config per case, as gpu_kernels.py --save-configs stores them
    for r in sorted((r for r in rows if r["ok"]), key=lambda r: -r["us"]):
        E, H, inter, K = bench.MOE_SHAPES[r["shape"]]
        tuned.setdefault(f"E={E},N={inter},fmt={r['fmt']}", {})[str(r["T"])] = r["config"]
    result = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "copy_GBps": copy_bw}
    result["tuned_configs"] = {"fused_moe_gemv": {card: tuned}}
    out.write_text(json.dumps({**result, "rows": rows}, indent=1))
    print(f"wrote {out} (store its best configs: python benchmarks/gpu_kernels.py --save-configs {out})")
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", help="JSON of every timing (default benchmarks/results/moe_gemv_sweep-<card>.json)"
    )
    ap.add_argument("--T", type=int, nargs="+", default=[1, 4], help="tokens per call")
    ap.add_argument("--fmts", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--shapes", nargs="+", default=list(bench.MOE_SHAPES), choices=list(bench.MOE_SHAPES))
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile workers; 1: none")
    ap.add_argument("--rep", type=int, default=100, help="milliseconds do_bench spends on each config")
    ap.add_argument("--compile", metavar="TASK_FILE", help=argparse.SUPPRESS)  # a compile worker's tasks
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


if __name__ == "__main__":
    torch.manual_seed(0)
    cli = parse_args()
    if cli.compile:
        compile_worker(cli.compile, cli.worker, cli.jobs)
    else:
        run(cli)
