"""The hardware profile's measured bandwidths next to independent torch measurements.

The profile measures memory read bandwidth with a Numba parallel sum over ~1 GiB; here torch sums
4 GiB of float32 on all physical cores. Both run in alternating rounds (best of each reported). On a CUDA machine the pinned host->GPU rate is checked
against a 1 GiB torch copy as well. Prints a table last and writes
benchmarks/results/profile-<machine>.json.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

from placement import detect
from placement.hardware import probe_cpu_bandwidth

RESULTS = Path(__file__).resolve().parent / "results"


def torch_read_bw(a: torch.Tensor, reps: int = 5) -> float:
    a.sum()
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t0))
    return best


def torch_pinned_h2d(size: int = 1 << 30, reps: int = 5) -> float:
    src = torch.ones(size, dtype=torch.uint8).pin_memory()
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, size / (time.perf_counter() - t0))
    return best


def machine_name(prof) -> str:
    gpu = prof.gpus[0].name if prof.gpus else "nogpu"
    raw = f"{prof.cpu_model}-{prof.physical_cores}c-{gpu}"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def main() -> int:
    t0 = time.perf_counter()
    prof = detect(refresh=True)
    probe_s = time.perf_counter() - t0
    gib = 4 if prof.ram_available > 16 << 30 else 1
    torch.set_num_threads(prof.physical_cores)
    big = torch.ones(gib << 28, dtype=torch.float32)  # gib GiB of 4-byte floats
    # Rounds alternate the two probes, so a neighbour's load on a shared machine hits both alike.
    ours, theirs = [prof.cpu_read_bw], []
    for _ in range(3):
        theirs.append(torch_read_bw(big))
        ours.append(probe_cpu_bandwidth(prof.physical_cores, prof.ram_available) or 0.0)
    del big
    rows = [("CPU memory read", max(ours), max(theirs), f"torch.sum {gib} GiB fp32, best of 3 rounds")]
    if torch.cuda.is_available():
        rows.append(("host->GPU pinned", prof.h2d_pinned_bw, torch_pinned_h2d(), "torch copy_ 1 GiB"))
    machine = machine_name(prof)
    out = {
        "machine": machine,
        "cpu": prof.cpu_model,
        "gpu": prof.gpus[0].name if prof.gpus else None,
        "physical_cores": prof.physical_cores,
        "profile_probe_seconds": probe_s,
        "cpu_read_rounds_gbps": {"profile": [x / 1e9 for x in ours], "torch": [x / 1e9 for x in theirs]},
        "checks": [
            {
                "what": w,
                "profile_gbps": p / 1e9,
                "independent_gbps": i / 1e9,
                "ratio": p / i,
                "independent": how,
            }
            for w, p, i, how in rows
        ],
        "profile": prof.to_dict(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"profile-{machine}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"machine: {machine}  (profile probes took {probe_s:.1f} s; wrote {path})")
    print(f"{'what':<18} {'profile GB/s':>13} {'independent GB/s':>17} {'ratio':>6}  independent probe")
    for w, p, i, how in rows:
        print(f"{w:<18} {p / 1e9:>13.1f} {i / 1e9:>17.1f} {p / i:>6.2f}  {how}")
    return 0 if all(0.8 <= p / i <= 1.2 for _, p, i, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
