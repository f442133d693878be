"""Launch-setting sweep for the decode attention kernels (GQA over a bf16 or int8 cache, MLA with 16 and
128 heads): each candidate is checked against the default's output and timed as its share of a CUDA
graph of calls on distinct KV blocks (gpu_kernels.py's graph timing), as a share of the copy bandwidth.

Run on a CUDA machine: python benchmarks/attention_sweep.py [--out FILE] [--ctx 32768 4096] [--quick]
[--pdl 0 1 3] [--defaults] (the default tiles only, under each programmatic-dependent-launch setting)
[--save-configs] (store each case's best as this device's launch settings where it beats the default
by SAVE_MARGIN at the longest context swept: gpu_kernels/configs/gqa_decode.json, mla_decode.json)
Prints the best candidates per case and a table of the best last; writes every timing as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import gpu_kernels._triton  # noqa: E402
from gpu_kernels.mla_attention import mla_decode_attention_triton, mla_decode_config, mla_key  # noqa: E402
from gpu_kernels.paged_attention import gqa_decode_config, gqa_key, paged_decode_attention_triton  # noqa: E402
from gpu_kernels.tuning import device_name, save_configs  # noqa: E402

_spec = importlib.util.spec_from_file_location("kernel_bench", Path(__file__).with_name("gpu_kernels.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

DEV = "cuda"
# The PDL settings swept here are the kernels' own: the decode chain's (which sets both bits) stays out.
gpu_kernels._triton.CHAIN_PDL = False
SAVE_MARGIN = 0.02  # a swept best must beat the default by this share of its time to be saved


def cases(ctxs, only, rows=(1, 16), mla_heads=(16, 128)):
    """(name, kernel, calls, bytes a call reads, candidate family, (settings file, shape key, rows, context,
    the settings a call takes now)) for every swept shape."""
    for ctx, N in itertools.product(ctxs, rows):
        if "gqa" in only:
            for cache in ("bf16", "int8"):
                calls, nbytes = bench.gqa_calls(cache, ctx, N)
                # gqa_calls: Qwen3-30B-A3B's heads
                now = gqa_decode_config(N, 4, 128, cache != "bf16")
                tuned = ("gqa_decode", gqa_key(4, 128, cache), N, ctx, now)
                yield (
                    f"gqa {cache} ctx={ctx} N={N}",
                    paged_decode_attention_triton,
                    calls,
                    nbytes,
                    "gqa",
                    tuned,
                )
        if "mla" in only:
            for H, name in ((16, "V2-Lite"), (128, "V3")):
                if H not in mla_heads:
                    continue
                calls, nbytes = bench.mla_calls(H, ctx, N)
                yield (
                    f"mla {name} H={H} ctx={ctx} N={N}",
                    mla_decode_attention_triton,
                    calls,
                    nbytes,
                    f"mla{H}",
                    ("mla_decode", mla_key(H), N, ctx, mla_decode_config(N, H)),
                )


def candidates(kind: str, quick: bool) -> list[dict]:
    splits = [(4, 256), (2, 128), (8, 512), (1, 64)]
    if kind == "gqa":
        grid = itertools.product((32, 64, 128), (4, 8), (2, 3, 4), splits + [(6, 384), (3, 192)], (0, 1, 2))
        return [
            {
                "BLOCK_N": bn,
                "num_warps": w,
                "num_stages": st,
                "WAVES": wv,
                "MAX_SPLITS": ms,
                "BT_AHEAD": ahead,
            }
            for bn, w, st, (wv, ms), ahead in grid
            if not quick or (st == 3 and ahead)
        ]
    heads = (16,) if kind == "mla16" else (32, 64)
    grid = itertools.product(heads, (16, 32, 64), (4, 8), (1, 2, 3), splits, (0, 1, 2), (1, 4))
    return [
        {"BLOCK_H": bh, "BLOCK_N": bn, "num_warps": w, "num_stages": st, "WAVES": wv, "MAX_SPLITS": ms}
        | {"BT_AHEAD": ahead, "CHUNKS": chunks}
        for bh, bn, w, st, (wv, ms), ahead, chunks in grid
        # 64 heads by 64 tokens: two stages fit (144 KB of shared memory), eight warps hold the accumulator
        if not (bh == 64 and bn == 64 and (w, st) != (8, 2)) and (not quick or st == 2 + min(ahead, 1))
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="attention_sweep.json")
    ap.add_argument("--ctx", type=int, nargs="+", default=[32768])
    ap.add_argument("--only", default="gqa,mla")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--bt-ahead", type=int, nargs="+", default=[0, 1, 2], help="block-id modes to sweep")
    ap.add_argument("--mla-heads", type=int, nargs="+", default=[16, 128], choices=[16, 128])
    ap.add_argument(
        "--pdl", type=int, nargs="+", default=[0], help="programmatic-dependent-launch flags to sweep (0-3)"
    )
    ap.add_argument("--defaults", action="store_true", help="only the default tiles (with each --pdl)")
    ap.add_argument(
        "--save-configs", action="store_true", help="store the bests that beat the defaults as this device's"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_bw = bench.copy_bandwidth()
    print(f"copy {copy_bw:.0f} GB/s", flush=True)
    results, best, saved, swept = {}, [], {}, {}
    for name, fn, calls, nbytes, kind, tuned in cases(args.ctx, args.only, args.rows, args.mla_heads):
        ref = fn(*calls[0][0], **calls[0][1])
        timings = []
        tiles = [{}] if args.defaults else candidates(kind, args.quick)
        cands = [{**c, "PDL": p} for c in tiles for p in args.pdl if c.get("BT_AHEAD", 0) in args.bt_ahead]
        for cfg in [None, *cands]:
            with_cfg = [(a, {**k, "config": cfg}) for a, k in calls]
            try:
                err = (fn(*with_cfg[0][0], **with_cfg[0][1]).float() - ref.float()).abs().max().item()
                if err > 5e-2:
                    print(f"FAIL {name} {cfg}: max error {err:.3g}", flush=True)
                    continue
                ms = bench.graph_calls_ms(fn, with_cfg)
            except Exception as e:  # out of resources etc.: skip the candidate
                print(f"skip {name} {cfg}: {str(e)[:120]}", flush=True)
                continue
            pct = 100 * nbytes / (ms * 1e-3) / 1e9 / copy_bw
            timings.append({"config": cfg, "us": ms * 1e3, "pct_copy": pct})
        timings.sort(key=lambda r: r["us"])
        default = (
            next(r for r in timings if r["config"] is None)
            if any(r["config"] is None for r in timings)
            else None
        )
        results[name] = timings
        print(
            f"\n{name}: default {default and round(default['us'], 1)} us {default and round(default['pct_copy'], 1)}%"
        )
        for r in timings[:4]:
            print(f"   {r['us']:8.1f} us {r['pct_copy']:5.1f}%  {r['config']}", flush=True)
        best.append((name, default, timings[0]))
        kernel, key, rows, ctx, now = tuned
        if ctx == max(args.ctx) and default:
            top = timings[0]
            beats = top["config"] is not None and top["us"] < default["us"] * (1 - SAVE_MARGIN)
            # every swept row of a saved key gets its entry (the current settings where they stayed best):
            # a key's rows without one would take the nearest row's settings instead of their defaults
            rows_of = swept.setdefault(kernel, {}).setdefault(key, {})
            rows_of[rows] = top["config"] if beats else now
            if beats:
                saved.setdefault(kernel, set()).add(key)
    Path(args.out).write_text(json.dumps(results, indent=1))
    if args.save_configs:
        card = device_name()
        arch = {card: "{}.{}".format(*torch.cuda.get_device_capability())}
        for kernel, keys in saved.items():
            shapes = {key: swept[kernel][key] for key in keys}
            print(f"{kernel}: {sorted(shapes)} -> {save_configs(kernel, {card: shapes}, arch)}")
    print(f"\n{'case':34s} {'default us':>10s} {'%':>5s} {'best us':>8s} {'%':>5s}  config")
    for name, d, b in best:
        du, dp = (d["us"], d["pct_copy"]) if d else (float("nan"),) * 2
        print(f"{name:34s} {du:10.1f} {dp:5.1f} {b['us']:8.1f} {b['pct_copy']:5.1f}  {b['config']}")


if __name__ == "__main__":
    main()
