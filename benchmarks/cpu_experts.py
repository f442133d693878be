"""CPU expert kernels: decode weight bandwidth against the machine's read bandwidth, prefill
tokens/s against torch's CPU bf16 matmuls, on DeepSeek-V2-Lite, Qwen3-30B-A3B and DeepSeek-V3
layer shapes.

Decode calls use fresh random expert ids each time and cycle over enough layers (>= 4x the
last-level cache) that weights come from DRAM, as in a real decode step.
Effective bandwidth = bytes of the selected experts' packed weights (with scales) / call time.

--engine adds decode rows (mode "engine") timed the way the engine calls the kernel: from a
worker thread, while the main thread keeps one core busy with small torch matmuls (standing
in for the Python loop that launches GPU work). Those calls use the kernel's default thread
count for a non-main thread.

--threads N runs the kernels (and the read-bandwidth probe) on N threads, e.g. 1 for the
per-core rates that decide how many cores a layer needs; its JSON is cpu_experts-Nt-<machine>.

    python benchmarks/cpu_experts.py [--quick] [--engine] [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from pathlib import Path

import numba
import numpy as np
from common import cpu_count, cpu_model, format_table, machine_name, write_json
from numba import prange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import cpu_kernels as ck  # noqa: E402
from cpu_kernels.formats import PackedExperts  # noqa: E402
from cpu_kernels.probe import llc_bytes, random_layer, time_decode, topk_ids  # noqa: E402

GiB = 1 << 30


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 16 * GiB


# ---------------------------------------------------------------- read bandwidth


@numba.njit(fastmath=True, cache=True)
def _sum(v):
    # fastmath lets LLVM vectorize the reduction; inside a prange body it would not
    s = np.float32(0.0)
    for i in range(v.size):
        s += v[i]
    return s


@numba.njit(parallel=True, cache=True)
def _sum_chunks(a, nchunks):
    # a [n] float32, one streaming chunk per task
    step = a.size // nchunks
    parts = np.zeros(nchunks, np.float32)
    for c in prange(nchunks):
        parts[c] = _sum(a[c * step : (c + 1) * step])
    return parts.sum()


def read_bandwidth(nbytes: int, reps: int) -> float:
    a = np.ones(nbytes // 4, np.float32)
    chunks = numba.get_num_threads() * 16
    _sum_chunks(a, chunks)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        _sum_chunks(a, chunks)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


# ---------------------------------------------------------------- random packed layers


def busy_main_thread(done: threading.Event) -> int:
    """Small single-threaded torch matmuls until done is set; returns how many ran."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    a = torch.tanh(a @ a * 0.01)
    n = 1
    while not done.is_set():
        a = torch.tanh(a @ a * 0.01)
        n += 1
    return n


def time_decode_engine(layers: list[PackedExperts], T: int, K: int, min_s: float, rng) -> tuple[float, float]:
    """time_decode from a worker thread while the main thread is busy in torch."""
    result: list = []
    done = threading.Event()
    warm = threading.Event()
    warm.set()
    busy_main_thread(warm)  # import torch and start its pool before the worker times anything

    def work():
        try:
            result.append(time_decode(layers, T, K, min_s, rng))
        finally:
            done.set()

    worker = threading.Thread(target=work)
    worker.start()
    busy_main_thread(done)
    worker.join()
    return result[0]


def time_prefill(layer: PackedExperts, T: int, K: int, reps: int, rng) -> float:
    x = rng.standard_normal((T, layer.H)).astype(np.float32)
    ids, w = topk_ids(rng, T, layer.E, K), rng.random((T, K)).astype(np.float32)
    ck.fused_moe(x, ids, w, layer)
    t0 = time.perf_counter()
    for _ in range(reps):
        ck.fused_moe(x, ids, w, layer)
    return T * reps / (time.perf_counter() - t0)


def torch_prefill(layer: PackedExperts, T: int, K: int, reps: int, rng) -> float:
    """Same bf16 bytes through torch.nn.functional.linear per expert (oneDNN; AMX where present)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(numba.get_num_threads())
    E, H, I, Hp = layer.E, layer.H, layer.I, layer.Hp  # noqa: E741
    gu = torch.from_numpy(layer.gate_up.view(np.int16)).view(torch.bfloat16)  # [E, I, 2, Hp]
    dn = torch.from_numpy(layer.down.view(np.int16)).view(torch.bfloat16)  # [E, H, Ip]
    x = torch.zeros(T, Hp, dtype=torch.bfloat16)  # [T, Hp]
    x[:, :H] = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
    ids = torch.from_numpy(topk_ids(rng, T, E, K).astype(np.int64))
    w = torch.from_numpy(rng.random((T, K)).astype(np.float32))

    def run():
        out = torch.zeros(T, H)
        for e in torch.unique(ids).tolist():
            rows, ks = torch.nonzero(ids == e, as_tuple=True)
            gate_up = F.linear(x[rows], gu[e].reshape(2 * I, Hp)).view(-1, I, 2)  # [n, I, 2]
            h = F.silu(gate_up[..., 0]) * gate_up[..., 1]  # [n, I]
            h = F.pad(h, (0, layer.Ip - I))  # [n, Ip]
            y = F.linear(h, dn[e]).float()  # [n, H]
            out.index_add_(0, rows, y * w[rows, ks, None])
        return out

    with torch.inference_mode():
        run()
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
    return T * reps / (time.perf_counter() - t0)


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timings, smaller read-bandwidth buffer")
    ap.add_argument(
        "--out", type=Path, default=None, help="directory for the JSON (default benchmarks/results)"
    )
    ap.add_argument("--formats", default="int4,int8,bf16")
    ap.add_argument("--shapes", default="v2-lite,qwen3,v3", help="layer shapes to time, of v2-lite,qwen3,v3")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument(
        "--engine", action="store_true", help="also time T=1 from a worker thread beside a busy main thread"
    )
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (default: all Numba threads)")
    args = ap.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
        ck.set_num_threads(args.threads)
    min_s = 0.6 if args.quick else 1.5
    reps = 1 if args.quick else 2
    rng = np.random.default_rng(0)
    threads = numba.get_num_threads()
    load = loadavg()  # before this run adds its own load: the machine may be shared
    print(f"machine {machine_name()}: {cpu_model()}, {cpu_count()} cpus, numba threads {threads}, "
          f"VNNI {ck.has_avx512_vnni()}, AMX {ck.has_amx()}", flush=True)  # fmt: skip

    bw = read_bandwidth((1 if args.quick else 4) * GiB, 3 if args.quick else 5)
    print(f"read bandwidth {bw:.1f} GB/s, load average before the run {load}", flush=True)

    big_ram = mem_available() > 64 * GiB
    shapes = {
        "v2-lite": dict(E=64, H=2048, I=1408, K=6),
        "qwen3": dict(E=128, H=2048, I=768, K=8),  # Qwen3-30B-A3B: small experts, fixed costs weigh more
        "v3": dict(E=256 if big_ram else 64, H=7168, I=2048, K=8),
    }
    wanted = args.shapes.split(",")
    unknown = set(wanted) - set(shapes)
    if unknown:
        raise SystemExit(f"unknown shapes {sorted(unknown)}: choose from {', '.join(shapes)}")
    shapes = {k: v for k, v in shapes.items() if k in wanted}
    target = max(4 * llc_bytes(), 512 << 20)
    rows, prefill = [], []
    for name, s in shapes.items():
        for fmt in args.formats.split(","):
            probe = random_layer(fmt, 1, s["H"], s["I"], 0)
            per_layer = probe.nbytes * s["E"]
            nlayers = max(1, math.ceil(target / per_layer))
            layers = [random_layer(fmt, s["E"], s["H"], s["I"], 1000 * i) for i in range(nlayers)]
            runs = [("alone", T) for T in (1, 4, 16)] + ([("engine", 1)] if args.engine else [])
            for mode, T in runs:
                timer = time_decode_engine if mode == "engine" else time_decode
                gbs, ms = timer(layers, T, s["K"], min_s, rng)
                rows.append(dict(shape=name, fmt=fmt, mode=mode, T=T, E=s["E"], layers=nlayers, ms=round(ms, 3),
                                 GBps=round(gbs, 1), ratio=round(gbs / bw, 3)))  # fmt: skip
                print(rows[-1], flush=True)
            if not args.no_prefill:
                tps = time_prefill(layers[0], 512, s["K"], reps, rng)
                prefill.append(dict(shape=name, fmt=fmt, T=512, tokens_per_s=round(tps, 1)))
                if fmt == "bf16":
                    ttps = torch_prefill(layers[0], 512, s["K"], reps, rng)
                    prefill.append(dict(shape=name, fmt="torch-bf16", T=512, tokens_per_s=round(ttps, 1)))
                print(prefill[-1], flush=True)
            del layers
    for p in prefill:
        base = next((q for q in prefill if q["shape"] == p["shape"] and q["fmt"] == "torch-bf16"), None)
        p["vs_torch_bf16"] = round(p["tokens_per_s"] / base["tokens_per_s"], 2) if base else ""

    data = dict(machine=machine_name(), cpu=cpu_model(), cpus=cpu_count(), threads=threads, loadavg=load,
                vnni=ck.has_avx512_vnni(), amx=ck.has_amx(), read_GBps=round(bw, 1), quick=args.quick,
                decode=rows, prefill=prefill)  # fmt: skip
    path = write_json(f"cpu_experts-{args.threads}t" if args.threads else "cpu_experts", data, args.out)
    print(f"\nwrote {path}")
    print(f"\n{cpu_model()} ({cpu_count()} cpus), read bandwidth {bw:.1f} GB/s\n")
    print(format_table(rows, ["shape", "fmt", "mode", "T", "E", "layers", "ms", "GBps", "ratio"]))
    if prefill:
        print()
        print(format_table(prefill, ["shape", "fmt", "T", "tokens_per_s", "vs_torch_bf16"]))


if __name__ == "__main__":
    main()
