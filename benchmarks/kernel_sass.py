"""Machine code of the decode attention and fused-MoE GEMV kernels at their shipped launch settings, compiled for Hopper
(sm_90) with Triton's own ptxas, on any machine (no GPU): registers, spills, shared memory, and the
instructions of each kernel's main loop per tile, and what its warps issue per KB of cache read. Issue-bound kernels
show it here before a GPU run; at batch 1 on an H100 these kernels were bound by latency instead
(benchmarks/RESULTS.md, GPU kernels).

    python benchmarks/kernel_sass.py [--out benchmarks/results]

Prints a table last and writes kernel_sass-sm90.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from gpu_kernels import gemv_tiles, mla_attention, moe_gemv, paged_attention  # noqa: E402
from gpu_kernels.sass import compile_for  # noqa: E402
from gpu_kernels.tuning import get_config  # noqa: E402

TUNED_ON = "NVIDIA H100 80GB HBM3"

_OUT = {"o_ptr": "*fp32", "lse_ptr": "*fp32", "bt_ptr": "*i32", "len_ptr": "*i32", "qk_scale": "fp32"}


def _case(name: str, kernel, cfg: dict, const: dict, types: dict, tile_bytes: int) -> tuple:
    """(name, kernel, constexprs, types, compiler options, cache bytes a loop iteration reads)."""
    const = {**const, "BLOCK_N": cfg["BLOCK_N"], "BT_AHEAD": cfg.get("BT_AHEAD", 0), "PDL": cfg.get("PDL", 0)}
    return (
        name,
        kernel,
        const,
        types,
        {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
        tile_bytes,
    )


def gqa_cases():
    Hkv, group, D = 4, 8, 128  # Qwen3-30B-A3B's heads
    shape = {
        "HKV": Hkv,
        "GROUP": group,
        "G_PAD": 16,
        "D": D,
        "D_PAD": D,
        "DV": D,
        "DV_PAD": D,
        "BLOCK_SIZE": 16,
    }
    for cache, kv, quant, elt in (("bf16", "*bf16", 0, 2), ("int8", "*i8", 1, 1)):
        types = {"q_ptr": "*bf16", "k_ptr": kv, "v_ptr": kv, "ks_ptr": "*fp32", "vs_ptr": "*fp32", **_OUT}
        per_token = 2 * D * elt + (8 if quant else 0)  # K and V of one kv head (+ their scales)
        for rows in (1, 16):
            cfg = paged_attention.gqa_decode_config(rows, Hkv, D, bool(quant))
            const = {**shape, "QUANT": quant, "ASM": 1}
            kernel = paged_attention._gqa_decode_kernel
            yield _case(f"gqa {cache} N={rows}", kernel, cfg, const, types, cfg["BLOCK_N"] * per_token)


def mla_cases():
    R, P = 512, 64
    types = {"ql_ptr": "*bf16", "qp_ptr": "*bf16", "c_ptr": "*bf16", **_OUT}
    for H in (16, 128):
        for rows in (1, 16):
            cfg = mla_attention.mla_decode_config(rows, H)
            const = {"H": H, "R": R, "P": P, "BLOCK_SIZE": 16, "BLOCK_H": cfg["BLOCK_H"]}
            kernel = mla_attention._mla_decode_kernel
            yield _case(f"mla H={H} N={rows}", kernel, cfg, const, types, cfg["BLOCK_N"] * (R + P) * 2)


def moe_cases():
    """The fused-MoE GEMV kernels at batch 1 (V2-Lite experts, shipped settings): one weight tile a
    program, no loop; the whole program's instructions against the weight bytes it reads."""
    E, H, inter = 64, 2048, 1408
    for fmt, elt, fmt_id, group in (("bf16", 2.0, 0, 128), ("int8", 1.0, 2, 128), ("int4", 0.5, 3, 128)):
        # the settings tuned on the H100, whatever machine compiles them here
        default = moe_gemv.fused_moe_gemv_config(1, E, inter, fmt, group)
        cfg = get_config("fused_moe_gemv", f"E={E},N={inter},fmt={fmt}", 1, default, device=TUNED_ON)
        bk = gemv_tiles._tile_k(cfg["BLOCK_K"], fmt_id, group)
        dot4 = int(fmt != "bf16" and cfg.get("DP4A", 0))
        w = "*i32" if dot4 else {"bf16": "*bf16", "int8": "*i8", "int4": "*u8"}[fmt]
        split1, iters1 = gemv_tiles._gemv_split(H, bk, cfg.get("SPLIT_K", 1))
        split2, iters2 = gemv_tiles._gemv_split(inter, bk, cfg.get("SPLIT_K2", 1))
        common = {
            "FMT": fmt_id,
            "GROUP": group,
            "BLOCK_N": cfg["BLOCK_N"],
            "BLOCK_K": bk,
            "USE_PDL": 1,
            "DOT4": dot4,
        }
        opts = {"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 1)}
        types = {"w_ptr": w, "s_ptr": "*fp32", "ids_ptr": "*i32"}
        gate_up = {**common, "TOPK": 6, "ITERS": iters1, "SPLIT_K": split1, "SROW": 1}
        gu_bytes = 2 * cfg["BLOCK_N"] * bk * iters1 * elt  # gate and up rows
        yield (f"moe {fmt} gate/up", moe_gemv._moe_gemv_gate_up_kernel, gate_up,
               {**types, "x_ptr": "*bf16", "p_ptr": "*fp32"}, opts, gu_bytes)  # fmt: skip
        bn2 = cfg.get("BLOCK_N2", cfg["BLOCK_N"])  # down's own tile height and warps, where set
        down = {**common, "BLOCK_N": bn2, "ITERS": iters2, "SPLIT_K": split1}
        opts2 = {**opts, "num_warps": cfg.get("num_warps2", cfg["num_warps"])}
        yield (f"moe {fmt} down", moe_gemv._moe_gemv_down_kernel, down,
               {**types, "p_ptr": "*fp32", "tw_ptr": "*fp32", "o_ptr": "*fp32"}, opts2, bn2 * bk * iters2 * elt)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for name, kernel, const, types, opts, tile_bytes in [*gqa_cases(), *mla_cases(), *moe_cases()]:
        # strides and offsets that are multiples of 16 at a real launch
        ints = [
            n
            for n in kernel.arg_names
            if n.startswith(("stride_q", "stride_w", "stride_s", "stride_x", "up_"))
        ]
        code = compile_for(kernel, const, types, aligned_ints=ints, **opts)
        # no loop (the GEMV kernels): the whole program runs once a tile
        per_tile = code.loop or code.instructions
        row = {
            "case": name,
            "launch": {**{k: v for k, v in const.items() if k in ("BLOCK_N", "BLOCK_H", "BT_AHEAD")}, **opts},
            "registers": code.registers,
            "spill_bytes": code.spill_bytes,
            "shared_KB": round(code.shared_bytes / 1024, 1),
            "loop_instructions": code.loop,
            "instructions_per_tile": per_tile,
            "tile_KB": round(tile_bytes / 1024, 1),
            # what the SM issues: each of the program's warps runs the loop (or the program) once a tile
            "warp_instructions_per_KB": round(per_tile * opts["num_warps"] / (tile_bytes / 1024), 1),
            "top_opcodes": code.loop_mix.most_common(6),
        }
        rows.append(row)
        print(f"{name}: {per_tile} instructions a {row['tile_KB']} KB tile", flush=True)
    from triton.backends.nvidia.compiler import get_ptxas

    result = {"target": "sm_90a", "ptxas": get_ptxas(90).version, "rows": rows}
    out = Path(args.out) / "kernel_sass-sm90.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(
        f"\nsm_90a, ptxas {result['ptxas']}: a loop iteration reads one tile; warp instructions a KB of cache"
    )
    head = f"{'case':16s} {'regs':>5s} {'spill B':>8s} {'smem KB':>8s} {'instr/tile':>10s} {'tile KB':>8s}"
    print(f"{head} {'warp instr/KB':>13s}")
    for r in rows:
        print(
            f"{r['case']:16s} {r['registers']:5d} {r['spill_bytes']:8d} {r['shared_KB']:8.1f} "
            f"{r['instructions_per_tile']:10d} {r['tile_KB']:8.1f} {r['warp_instructions_per_KB']:13.1f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
