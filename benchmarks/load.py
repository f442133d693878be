"""Time to first token from process start: hetero's converted layout against the HF checkpoint,
and against reading the files from disk once.

    python benchmarks/load.py MODEL_DIR [--converted DIR] [--experts int4] [--gpu-mem 6GiB]

Each load runs in a fresh process (so imports and the page cache are those a user sees), which
reports its own import, load and first-token times; one untimed process first compiles and caches
the kernels (reported apart, as JIT time). The page cache is dropped before
each cold run when the machine allows it (root writing /proc/sys/vm/drop_caches); otherwise only
warm numbers are reported, and the JSON says so. Prints a table last; writes JSON under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from benchmarks.common import format_table, machine_name, write_json  # noqa: E402

# What the child process runs: load, then one greedy token; prints its own timings as JSON.
CHILD = """
import json, sys, time
t0 = float(sys.argv[1])
t_imp = time.time()
from hetero.readahead import read_ahead
read_ahead(sys.argv[2])  # as the hetero command does before its imports
import torch
from hetero.bench import cap_device_memory
from hetero.runtime import RuntimeOptions, load_runtime
from hetero.sampling import SamplingParams
import cpu_kernels
t_imported = time.time()
gpu_mem = int(sys.argv[3]) if sys.argv[3] != "0" else None
cap_device_memory(gpu_mem)
opts = RuntimeOptions(offload=True, gpu_mem=gpu_mem, experts=sys.argv[4], max_batch=1, max_model_len=256, progress=False)
rt = load_runtime(sys.argv[2], opts)
if torch.cuda.is_available():
    torch.cuda.synchronize()
t_loaded = time.time()
rt.engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
t_first = time.time()
print("RESULT " + json.dumps({
    "interpreter_s": t_imp - t0, "import_s": t_imported - t_imp, "load_s": t_loaded - t_imported,
    "first_token_s": t_first - t_loaded, "total_s": t_first - t0,
}))
"""


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_once_s(path: Path) -> tuple[float, int]:
    """Seconds to read every file under ``path`` once, and the bytes read."""
    t = time.perf_counter()
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    return time.perf_counter() - t, total


def load_in_child(model: Path, gpu_mem: int, experts: str) -> dict:
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, repr(t0), str(model), str(gpu_mem), experts],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"loading {model} failed:\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="Hugging Face checkpoint directory")
    ap.add_argument("--converted", default=None, help="converted directory (made from MODEL if missing)")
    ap.add_argument("--experts", default="int4", choices=["int4", "int8", "bf16"])
    ap.add_argument("--gpu-mem", default="0", help="device cap, e.g. 6GiB (0 = the plan's default)")
    args = ap.parse_args(argv)
    from hetero.convert import convert
    from placement.units import parse_size

    src = Path(args.model)
    converted = Path(args.converted) if args.converted else src.with_name(f"{src.name}-hetero-{args.experts}")
    if not (converted / "manifest.json").is_file():
        t = time.perf_counter()
        convert(src, converted, experts=args.experts, progress=False)
        print(f"converted in {time.perf_counter() - t:.1f}s -> {converted}")
    gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem != "0" else 0
    # The first process on a machine compiles the Numba and Triton kernels and caches them on disk;
    # every later one loads them. Run it apart, so the rows below time loading, not compiling.
    first = load_in_child(converted, gpu_mem, args.experts)
    rows = []
    for cache in ("cold", "warm"):
        for name, path in (("converted", converted), ("hf checkpoint", src)):
            dropped = drop_page_cache() if cache == "cold" else None
            if cache == "cold" and not dropped:
                continue
            read_s, nbytes = read_once_s(path)
            if cache == "cold":
                drop_page_cache()
            res = load_in_child(path, gpu_mem, args.experts)
            rows.append(
                {
                    "source": name,
                    "page_cache": cache,
                    "GB": nbytes / 1e9,
                    "read_files_s": read_s,
                    **res,
                    "ttft_over_read": res["total_s"] / read_s,
                }
            )
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    cold_ok = any(r["page_cache"] == "cold" for r in rows)
    warm = next(r for r in rows if r["page_cache"] == "warm" and r["source"] == "converted")
    jit_s = first["first_token_s"] + first["load_s"] - warm["first_token_s"] - warm["load_s"]
    out = write_json(
        "load",
        {
            "model": src.name,
            "experts": args.experts,
            "device": device,
            "machine": machine_name(),
            "page_cache_dropped": cold_ok,
            "first_process": first,
            "jit_compile_s": jit_s,
            "rows": rows,
        },
    )
    cols = ["source", "page_cache", "GB", "read_files_s", "import_s", "load_s", "first_token_s", "total_s"]
    cols.append("ttft_over_read")
    shown = [{c: (f"{r[c]:.3f}" if isinstance(r[c], float) else r[c]) for c in cols} for r in rows]
    print(format_table(shown, cols))
    print(
        f"first process on this machine (compiles and caches the kernels): {first['total_s']:.1f} s, "
        f"of which JIT compilation ~{jit_s:.1f} s (its load and first token over a warm run's)"
    )
    print(f"page cache dropped for cold runs: {cold_ok}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
