"""How fast this GPU reads a decode kernel's worth of bytes: the ceiling a one-token kernel of that size
can reach, next to the large-copy bandwidth that gpu_kernels.py takes its shares of.

A bare read kernel (gpu_kernels.py's read_words: every program sums its share of int32 words and
writes one word back per lane; 30 settings of tile, tiles a program and warps, the best kept) and
device-to-device copies, each timed as a call's share of one CUDA graph of LAYERS calls on distinct
buffers (gpu_kernels.py's graph timing),
at the byte counts of the decode-path cases there: the fused MoE at one token (int4 / int8 / bf16
experts of V2-Lite and Qwen3-30B-A3B), 16-head MLA and GQA at 32k context; and at 1 GiB. (A copy
captured into a graph runs as the graph's copy node, not the kernel an eager copy launches, and
came out slower at 1 GiB than gpu_kernels.py's eager copy: the read column is the ceiling.)

Run on a CUDA machine: python benchmarks/read_ceiling.py [--out DIR]
Prints a table last and writes read_ceiling-<gpu>.json under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("kernel_bench", Path(__file__).with_name("gpu_kernels.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

DEV = "cuda"
# (what, bytes a call reads): gpu_kernels.py's rows of those cases on the H200 (moe_bytes, KV bytes)
SIZES = (
    ("fused MoE, Qwen3-30B-A3B int4, 1 token", 20_054_016),
    ("fused MoE, V2-Lite int4, 1 token", 27_574_272),
    ("MLA decode, 16 heads, 32k, 1 row", 37_748_736),
    ("fused MoE, Qwen3-30B-A3B int8, 1 token", 37_863_424),
    ("fused MoE, V2-Lite int8, 1 token", 52_021_248),
    ("GQA decode, bf16 cache, 32k, 1 row", 67_108_864),
    ("fused MoE, V2-Lite bf16, 1 token", 103_809_024),
    ("1 GiB", 1 << 30),
)
# the bare read's settings swept here: tile words, tiles a program, warps
SETTINGS = tuple(itertools.product((1024, 2048, 4096), (2, 4, 8, 16, 32), (4, 8)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    copy_bw = bench.copy_bandwidth()
    card = torch.cuda.get_device_name()
    print(f"{card}: device-to-device copy {copy_bw:.0f} GB/s (1 GiB, read + write)", flush=True)
    rows = []
    for what, nbytes in SIZES:
        read_us, (block, iters, warps) = bench.read_ceiling_us(nbytes, SETTINGS)
        bufs = bench.read_buffers(nbytes)
        dsts = [torch.empty_like(b) for b in bufs]
        copy_us = 1e3 * bench.graph_calls_ms(
            torch.Tensor.copy_, [((d, b), {}) for d, b in zip(dsts, bufs)], rep=50
        )
        r = {
            "what": what,
            "bytes": nbytes,
            "read_us": read_us,
            "read_GBps": nbytes / (read_us * 1e-6) / 1e9,
            "read_over_copy_bw": nbytes / (read_us * 1e-6) / 1e9 / copy_bw,
            "read_config": {"BLOCK": block, "ITERS": iters, "num_warps": warps},
            "copy_us": copy_us,
            "copy_GBps": 2 * nbytes / (copy_us * 1e-6) / 1e9,
            "copy_over_copy_bw": 2 * nbytes / (copy_us * 1e-6) / 1e9 / copy_bw,
        }
        rows.append(r)
        print(
            f"{what}: read {r['read_us']:.1f} us ({r['read_over_copy_bw']:.2f}), copy {copy_us:.1f} us",
            flush=True,
        )
        del bufs, dsts
    cpu = bench.cpu_name()
    print(
        f"\n{card} | {cpu} | copy bandwidth {copy_bw:.0f} GB/s (graph of {bench.LAYERS} calls on distinct buffers)"
    )
    print(
        f"{'bytes of':42s} {'MB':>7s} {'read us':>8s} {'GB/s':>6s} {'of copy bw':>10s} {'copy us':>8s} {'of copy bw':>10s}"
    )
    for r in rows:
        print(
            f"{r['what']:42s} {r['bytes'] / 1e6:7.1f} {r['read_us']:8.1f} {r['read_GBps']:6.0f} "
            f"{r['read_over_copy_bw']:10.2f} {r['copy_us']:8.1f} {r['copy_over_copy_bw']:10.2f}"
        )
    out = Path(args.out) / f"read_ceiling-{re.sub(r'[^a-z0-9]+', '-', card.lower()).strip('-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"card": card, "cpu": cpu, "copy_GBps": copy_bw, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
