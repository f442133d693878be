"""Achieved memory bandwidth of the gpu_kernels decode-path kernels, next to the device copy bandwidth.

Run on a CUDA machine: python benchmarks/gpu_kernels.py [--out DIR]
Prints one table last and writes gpu_kernels-<gpu>.json (card, CPU, every row) under --out
(default benchmarks/results). Times are medians from triton.testing.do_bench, which flushes L2 between runs:
"us" is one eager call; "graph us" is a call's share of one CUDA graph of LAYERS calls, each on its own
data (KV blocks, experts, weights), as a decode step replays them layer after layer. Fused-MoE
candidates are ranked by that graph time, at decode batches and at prefill chunks (512, 2048 tokens).
"of read" is a bare read of the row's bytes (read_words) in that same graph timing over the row's graph
time: at one token or row a call's start and drain keep even a plain read well under the large-copy
bandwidth (benchmarks/read_ceiling.py), so this says how close the kernel comes to any kernel that
reads as much.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import re
import sys
from pathlib import Path

# run as a script, this file's folder leads sys.path and its name would shadow the gpu_kernels package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import gpu_kernels as gk  # noqa: E402
from gpu_kernels import linear_gemv, moe, moe_gemv, quant  # noqa: E402
from gpu_kernels.mla_attention import mla_decode_attention_triton  # noqa: E402
from gpu_kernels.paged_attention import paged_decode_attention_triton  # noqa: E402
from gpu_kernels.tuning import save_configs  # noqa: E402

DEV = "cuda"
GB = 1e9


def bench_ms(fn, *args, rep: int = 200, **kwargs) -> float:
    """Median milliseconds of fn(*args, **kwargs)."""
    fn(*args, **kwargs)  # compile outside the timed region
    torch.cuda.synchronize()
    return triton.testing.do_bench(lambda: fn(*args, **kwargs), warmup=25, rep=rep, return_mode="median")


GRAPH_ERRORS: list[str] = []  # why a capture failed, kept for the JSON


LAYERS = 8  # calls per timed graph, each on its own data, as a decode step runs its layers


def capture_graph(fn, calls: list[tuple[tuple, dict]]) -> torch.cuda.CUDAGraph:
    """One CUDA graph running fn(*args, **kwargs) for every entry of calls (run once outside the
    capture first, on a side stream: compilation and allocations stay out of the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args, kwargs in calls:
            fn(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args, kwargs in calls:
            fn(*args, **kwargs)
    return graph


def graph_calls_ms(fn, calls: list[tuple[tuple, dict]], rep: int = 200) -> float:
    """Median milliseconds per call of one CUDA graph running fn(*args, **kwargs) for every entry of calls.

    Each call reads its own data (other KV blocks, other experts), so nothing it reads is still in L2
    from the call before; this is how a decode step's graph runs a kernel once per layer, and it spreads
    the graph launch over the calls instead of charging it to one."""
    try:
        return bench_ms(capture_graph(fn, calls).replay, rep=rep) / len(calls)
    except RuntimeError as err:  # a capture failure should not cost the rest of the run
        GRAPH_ERRORS.append(f"{getattr(fn, '__name__', fn)}: {err}")
        print(f"graph capture failed: {err}", flush=True)
        return float("nan")


READ_CEILING = True  # --no-read-ceiling: leave out each row's bare read of its bytes (read_ceiling_us)
KERNEL_TIMES = False  # --kernel-times: each row also gets its kernels' device time inside the graph


def graph_kernel_us(fn, calls: list[tuple[tuple, dict]], reps: int = 20) -> dict[str, float]:
    """Device microseconds per call of each kernel in the graph of graph_calls_ms, from the profiler:
    where a call's time goes (a kernel launched early by programmatic dependent launch counts its
    wait too, so these may add up to more than the graph's time)."""
    graph = capture_graph(fn, calls)
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:60]] = per.get(e.name[:60], 0.0) + e.device_time_total / (reps * len(calls))
    return per


def graph_extra(fn, calls: list[tuple[tuple, dict]]) -> dict:
    """{"kernel_us": ...} with --kernel-times, else nothing."""
    return {"kernel_us": graph_kernel_us(fn, calls)} if KERNEL_TIMES else {}


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus bytes written, GB/s."""
    src = torch.randn(256 * 2**20, device=DEV)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(dst.copy_, src)
    return 2 * src.numel() * 4 / (ms * 1e-3) / GB


@triton.jit
def _read_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Sum ITERS tiles of BLOCK int32 words (this program's share of x [n]) into o [programs, BLOCK]."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(o_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def read_words(x: torch.Tensor, out: torch.Tensor, block: int, iters: int, warps: int) -> None:
    """A bare read of x (int32 words): _read_kernel over all of it."""
    n = x.numel()
    _read_kernel[(triton.cdiv(n, block * iters),)](x, out, n, BLOCK=block, ITERS=iters, num_warps=warps)


# the bare read's settings: tile words, tiles a program, warps (the best at 20 MB - 1 GiB on the H200
# came from these, read_ceiling-nvidia-h200.json)
READ_SETTINGS = ((1024, 8, 8), (1024, 16, 8), (2048, 8, 8), (1024, 8, 4))
_READ_US: dict[tuple, tuple[float, tuple]] = {}


def read_buffers(nbytes: int) -> list[torch.Tensor]:
    """Random int32 buffers of nbytes each, as many as a timed graph takes calls (LAYERS; 2 above 256 MB)."""
    layers = 2 if nbytes > 256 << 20 else LAYERS
    words = max(1, nbytes // 4)
    return [
        torch.randint(-(2**31), 2**31 - 1, (words,), dtype=torch.int32, device=DEV) for _ in range(layers)
    ]


def read_ceiling_us(nbytes: int, settings=READ_SETTINGS) -> tuple[float, tuple]:
    """(microseconds, (block, iters, warps)) of the fastest bare read of nbytes over ``settings``, a
    call's share of a graph of calls on distinct buffers (read_buffers) as the kernels are timed: what
    any kernel reading that many bytes in that timing could reach. Cached by size and settings."""
    key = (nbytes, tuple(settings))
    if key not in _READ_US:
        bufs = read_buffers(nbytes)
        words = bufs[0].numel()
        best = None
        for block, iters, warps in settings:
            out = torch.empty(triton.cdiv(words, block * iters) * block, dtype=torch.int32, device=DEV)
            us = 1e3 * graph_calls_ms(read_words, [((b, out, block, iters, warps), {}) for b in bufs], rep=50)
            if best is None or us < best[0]:
                best = (us, (block, iters, warps))
        _READ_US[key] = best
    return _READ_US[key]


def paged_setup(N: int, ctx: int, bs: int = 16):
    nblk = ctx // bs
    table = torch.randperm(N * nblk, device=DEV).view(N, nblk).int()  # scattered blocks, as after churn
    lens = torch.full((N,), ctx, dtype=torch.int32, device=DEV)
    return table, lens, N * nblk


def row(kind, shape, batch, nbytes, ms, ref_ms, copy_bw, extra=None, g_ms=None):
    bw = nbytes / (ms * 1e-3) / GB
    extra = dict(extra or {})
    if g_ms is not None:
        extra.update(graph_ms=g_ms, graph_pct_copy=100 * nbytes / (g_ms * 1e-3) / GB / copy_bw)
        if READ_CEILING and g_ms == g_ms:  # not NaN (a failed capture)
            read_us, _ = read_ceiling_us(nbytes)
            extra.update(read_ceiling_us=read_us, graph_over_read=read_us / (g_ms * 1e3))
    r = {
        "kernel": kind,
        "shape": shape,
        "batch": batch,
        "bytes": nbytes,
        "ms": ms,
        "GB/s": bw,
        "pct_copy": 100 * bw / copy_bw,
        "ref_ms": ref_ms,
        "speedup_vs_ref": None if ref_ms is None else ref_ms / ms,
    }
    r.update(extra or {})
    print(
        f"{kind:10s} {shape:34s} b={batch:<3d} {ms * 1e3:9.1f} us {bw:7.0f} GB/s {r['pct_copy']:5.1f}%",
        flush=True,
    )
    return r


def gqa_calls(cache: str, ctx: int, N: int) -> tuple[list[tuple[tuple, dict]], int]:
    """LAYERS decode-attention calls (Qwen3-30B-A3B heads) over one paged pool, each with its own block
    tables and queries, and the KV bytes one call reads."""
    Hq, Hkv, D = 32, 4, 128
    table, lens, nb = paged_setup(N * LAYERS, ctx)
    kc = torch.randn(nb, 16, Hkv, D, device=DEV)
    vc = torch.randn(nb, 16, Hkv, D, device=DEV)
    ks = vs = None
    if cache == "int8":
        (kc, ks), (vc, vs) = (
            gk.kv_write.quantize_per_token(kc, torch.int8),
            gk.kv_write.quantize_per_token(vc, torch.int8),
        )
    else:
        kc, vc = kc.bfloat16(), vc.bfloat16()
    calls = [
        (
            (torch.randn(N, Hq, D, device=DEV).bfloat16(), kc, vc, table[i * N : (i + 1) * N])
            + (lens[:N], D**-0.5, ks, vs),
            {"max_seq_len": ctx},
        )
        for i in range(LAYERS)
    ]
    nbytes = 2 * N * ctx * Hkv * D * kc.element_size() + (0 if ks is None else 2 * N * ctx * Hkv * 4)
    return calls, nbytes


def mla_calls(H: int, ctx: int, N: int) -> tuple[list[tuple[tuple, dict]], int]:
    """LAYERS MLA decode calls (R = 512, P = 64) over one paged latent pool, and the bytes one reads."""
    R, P = 512, 64
    table, lens, nb = paged_setup(N * LAYERS, ctx)
    cache = torch.randn(nb, 16, R + P, device=DEV).bfloat16()
    calls = [
        (
            (
                torch.randn(N, H, R, device=DEV).bfloat16(),
                torch.randn(N, H, P, device=DEV).bfloat16(),
                cache,
                table[i * N : (i + 1) * N],
                lens[:N],
                192**-0.5,
            ),
            {"max_seq_len": ctx},
        )
        for i in range(LAYERS)
    ]
    return calls, N * ctx * (R + P) * 2


def bench_gqa(copy_bw: float, rows: list) -> None:
    for cache in ("bf16", "int8"):
        for ctx in (4096, 32768):
            for N in (1, 16):
                calls, nbytes = gqa_calls(cache, ctx, N)
                args, kwargs = calls[0]
                ms = bench_ms(paged_decode_attention_triton, *args, **kwargs)
                ref_ms = bench_ms(gk.paged_decode_attention_reference, *args, rep=50)
                g = graph_calls_ms(paged_decode_attention_triton, calls)
                shape = f"Hq=32,Hkv=4,D=128,{cache},ctx={ctx}"
                extra = graph_extra(paged_decode_attention_triton, calls)
                rows.append(row("gqa", shape, N, nbytes, ms, ref_ms, copy_bw, extra, g_ms=g))


def bench_mla(copy_bw: float, rows: list) -> None:
    for H, name in ((16, "V2-Lite"), (128, "V3")):
        for ctx in (4096, 32768):
            for N in (1, 16):
                calls, nbytes = mla_calls(H, ctx, N)
                args, kwargs = calls[0]
                ms = bench_ms(mla_decode_attention_triton, *args, **kwargs)
                ref_ms = bench_ms(gk.mla_decode_attention_reference, *args, rep=50)
                g = graph_calls_ms(mla_decode_attention_triton, calls)
                rows.append(
                    row(
                        "mla",
                        f"{name} H={H},R=512,P=64,ctx={ctx}",
                        N,
                        nbytes,
                        ms,
                        ref_ms,
                        copy_bw,
                        graph_extra(mla_decode_attention_triton, calls),
                        g_ms=g,
                    )
                )


MOE_SHAPES = {"V2-Lite": (64, 2048, 1408, 6), "Qwen3-30B-A3B": (128, 2048, 768, 8)}


def moe_weights(E, H, inter, fmt):
    w13 = gk.quantize_weight(torch.randn(E, 2 * inter, H, device=DEV) * 0.02, fmt, 128)
    w2 = gk.quantize_weight(torch.randn(E, H, inter, device=DEV) * 0.02, fmt, 128)
    return w13, w2


def moe_bytes(w13, w2, ids) -> int:
    E = w13.shape[0]
    touched = torch.unique(ids[ids >= 0]).numel()
    return touched * (w13.nbytes() + w2.nbytes()) // E


def moe_layer_calls(x, w13, w2, ids, wts, cfg) -> list[tuple[tuple, dict]]:
    """LAYERS calls on the same weights, routed to other experts each time (disjoint ones while they
    last), so no call finds the previous call's weights in L2."""
    E, (T, K) = w13.shape[0], ids.shape
    perm = torch.randperm(E, device=DEV)
    calls = []
    for i in range(LAYERS):
        if T * K * (i + 1) <= E:
            ids_i = perm[i * T * K : (i + 1) * T * K].view(T, K).int()
        else:
            ids_i = torch.stack([torch.randperm(E, device=DEV)[:K] for _ in range(T)]).int()
        calls.append(((x, w13, w2, ids_i, wts, cfg), {}))
    return calls


# decode batches, then prefill chunks (hetero bench runs a prompt as one chunk of up to its length; the
# server's steps hold 512 tokens): streamed prefill runs the sorted kernels at those sizes, compute-bound
MOE_BATCHES = (1, 16, 64, 512, 2048)
MOE_FORMATS = ("bf16", "int8", "int4")
TUNE = True  # --no-tune: time only the shipped config of each shape (what fused_moe / quant_linear run)


def bench_moe(copy_bw: float, rows: list, tuned: dict) -> None:
    for name, (E, H, inter, K) in MOE_SHAPES.items():
        for fmt in MOE_FORMATS:
            w13, w2 = moe_weights(E, H, inter, fmt)
            for T in MOE_BATCHES:
                x = torch.randn(T, H, device=DEV).bfloat16()
                ids = torch.stack([torch.randperm(E, device=DEV)[:K] for _ in range(T)]).int()
                wts = torch.rand(T, K, device=DEV)
                # path -> (graph ms, config); a config with BLOCK_M runs the sorted path. Candidates are
                # ranked by their share of a graph of layer calls: decode steps replay graphs, and an
                # eager call's launch cost would rank them by the host instead
                best = {}
                shipped = (
                    moe_gemv.fused_moe_gemv_config(T, E, inter, fmt, 128)
                    if moe_gemv.takes_gemv(T * K, fmt)
                    else moe.fused_moe_config(T, E, inter, fmt, 128)
                )
                for cfg in moe_candidates(T, K, fmt) if TUNE else [shipped]:
                    try:
                        calls = moe_layer_calls(x, w13, w2, ids, wts, cfg)
                        g = graph_calls_ms(moe.fused_moe_triton, calls, rep=100)
                    except Exception as err:  # e.g. a tile over the shared memory: not a candidate here
                        print(f"skip {cfg}: {str(err)[:100]}", flush=True)
                        continue
                    path = "sorted" if "BLOCK_M" in cfg else "gemv"
                    if g == g and (path not in best or g < best[path][0]):  # g is NaN if capture failed
                        best[path] = (g, cfg)
                for path, (_, cfg) in best.items():
                    kernel = "fused_moe" if path == "sorted" else "fused_moe_gemv"
                    tuned.setdefault(kernel, {}).setdefault(f"E={E},N={inter},fmt={fmt}", {})[str(T)] = cfg
                g_ms, cfg = min(best.values(), key=lambda b: b[0])
                per_path = {f"{path}_graph_ms": b[0] for path, b in best.items()}
                if "BLOCK_M" in cfg:
                    per_path["align_ms"] = bench_ms(gk.moe_align_block_size, ids, cfg["BLOCK_M"], E)
                # the torch reference loops over experts in Python: seconds a call at prefill sizes
                ref_ms = bench_ms(moe.fused_moe_reference, x, w13, w2, ids, wts, rep=50) if T <= 64 else None
                flops = 2 * T * K * 3 * H * inter  # gate, up and down of every routed slot
                per_path["TFLOPs"] = flops / (g_ms * 1e-3) / 1e12
                per_path.update(graph_extra(moe.fused_moe_triton, moe_layer_calls(x, w13, w2, ids, wts, cfg)))
                rows.append(
                    row(
                        "fused_moe",
                        f"{name} E={E},H={H},I={inter},K={K},{fmt}",
                        T,
                        moe_bytes(w13, w2, ids),
                        bench_ms(moe.fused_moe_triton, x, w13, w2, ids, wts, cfg, rep=100),
                        ref_ms,
                        copy_bw,
                        {"config": cfg, **per_path},
                        g_ms=g_ms,
                    )
                )


def moe_candidates(T: int, K: int, fmt: str) -> list[dict]:
    """Sorted-path configs, then GEMV ones (no BLOCK_M) up to twice the slots where GEMV is the default.

    Sorted tiles are (BLOCK_N, BLOCK_K, num_warps, num_stages[, BLOCK_M]), BLOCK_M otherwise the
    batch's default. GEMV tiles are (BLOCK_N, BLOCK_K, SPLIT_K, SPLIT_K2, num_warps, PDL[, BLOCK_N2, num_warps2]); a split
    count is a cap that the wrapper cuts to the input dim's BLOCK_K tiles, so 16 is one tile a program at
    these shapes; BLOCK_N2 / num_warps2 are down's own tile rows / warps (else BLOCK_N / num_warps)."""
    sorted_tiles = ((32, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (32, 256, 2, 4), (64, 128, 8, 4))
    if T >= 512:  # prefill chunks: taller tiles amortize each dequantized weight tile over more rows
        sorted_tiles += (
            (128, 64, 8, 3, 128),
            (64, 64, 4, 4, 128),
            (128, 64, 8, 4, 128),
            (128, 64, 4, 3, 32),
        )
    sorted_cfg = moe.fused_moe_config(T, 1, 1, fmt, 128)
    out = [sorted_cfg]
    for bn, bk, w, st, *bm in sorted_tiles:
        bk = min(bk, 128) if fmt == "int4" else bk  # the sorted path's tile: one group scale
        cand = {**sorted_cfg, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
        cand.update({"BLOCK_M": bm[0]} if bm else {})
        if cand not in out:
            out.append(cand)
    if T * K > 2 * moe_gemv.GEMV_MAX_SLOTS:
        return out
    one_byte = (
        (64, 128, 16, 16, 4, 1), (16, 1024, 1, 16, 4, 1), (8, 1024, 1, 16, 4, 1), (32, 256, 16, 16, 4, 1),
        (4, 2048, 16, 16, 2, 1), (8, 2048, 16, 16, 4, 1), (64, 512, 16, 16, 8, 1), (32, 512, 16, 16, 8, 1),
        (32, 256, 16, 16, 4, 0), (64, 512, 16, 16, 8, 0), (16, 1024, 1, 16, 4, 0), (64, 128, 16, 16, 4, 0),
        (64, 256, 16, 16, 8, 0),
    )  # fmt: skip
    gemv_tiles = {
        "bf16": (
            (16, 1024, 16, 16, 8, 1), (4, 1024, 1, 16, 4, 1), (8, 1024, 1, 16, 4, 1), (4, 2048, 16, 16, 4, 1),
            (8, 2048, 16, 16, 8, 1), (32, 256, 16, 16, 4, 1), (16, 512, 16, 16, 8, 1), (64, 256, 16, 16, 8, 1),
            (32, 256, 16, 16, 4, 0), (16, 1024, 16, 16, 8, 0), (4, 2048, 16, 16, 4, 0), (64, 256, 16, 16, 8, 0),
            (8, 1024, 1, 16, 4, 0),
        ),
        "int8": one_byte,
        "fp8": one_byte,
        "int4": (  # BLOCK_K spans BLOCK_K / 128 groups
            (64, 128, 16, 16, 2, 1), (32, 256, 16, 16, 2, 1), (32, 256, 16, 16, 4, 1), (64, 256, 16, 16, 4, 1),
            (32, 128, 16, 16, 2, 1), (16, 256, 16, 16, 2, 1), (32, 512, 16, 16, 4, 1), (64, 256, 16, 16, 2, 1),
            (32, 256, 16, 16, 4, 0), (32, 256, 16, 16, 2, 0), (64, 256, 16, 16, 4, 0), (64, 128, 16, 16, 2, 0),
            (64, 256, 16, 16, 2, 0), (32, 1024, 16, 16, 4, 1), (16, 1024, 16, 16, 4, 1), (16, 2048, 16, 16, 4, 1),
            (64, 512, 16, 16, 4, 1), (32, 512, 16, 16, 2, 1), (8, 2048, 16, 16, 4, 1), (32, 1024, 16, 16, 8, 1),
            (32, 1024, 1, 16, 4, 1), (16, 1024, 1, 16, 4, 1), (16, 2048, 1, 16, 4, 1), (8, 2048, 1, 16, 4, 1),
            (64, 512, 2, 16, 4, 1), (32, 512, 4, 16, 4, 1), (32, 256, 4, 16, 2, 1), (64, 256, 2, 16, 4, 1),
            # taller down tiles (BLOCK_N2, its warps): each re-reads the gate/up partials of its columns
            (64, 256, 16, 16, 2, 1, 128, 4), (64, 256, 16, 16, 2, 1, 256, 4), (64, 256, 16, 16, 2, 1, 256, 8),
            (64, 128, 16, 16, 2, 1, 256, 4), (64, 512, 16, 16, 4, 1, 256, 8), (32, 256, 16, 16, 2, 1, 512, 8),
            (64, 256, 16, 16, 2, 1, 128, 2), (64, 512, 16, 16, 4, 1, 128, 4),
        ),
    }[fmt]  # fmt: skip
    gemv_cfg = moe_gemv.fused_moe_gemv_config(T, 1, 1, fmt, 128)
    out.append(gemv_cfg)
    for i, (bn, bk, s1, s2, w, pdl, *down) in enumerate(gemv_tiles):
        cand = {**gemv_cfg, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": s1, "SPLIT_K2": s2, "num_warps": w}
        cand.update(PDL=pdl, **dict(zip(("BLOCK_N2", "num_warps2"), down)))
        # int4 / int8: integer dot products on int8-rounded activations (DP4A) and the float path, both
        # (int4's float path, slower on an H100 at every tile measured, over the first few tiles only)
        dot4 = fmt == "int8" or (fmt == "int4" and i < 4)
        for variant in (
            ({**cand, "DP4A": 1}, {**cand, "DP4A": 0}) if dot4 else ({**cand, "DP4A": int(fmt == "int4")},)
        ):
            if variant not in out:
                out.append(variant)
    return out


def bench_quant_linear(copy_bw: float, rows: list, tuned: dict) -> None:
    N, K = 8192, 4096
    w = torch.randn(N, K, device=DEV) * 0.02
    for fmt in ("bf16", "fp8", "int8", "int4"):
        qw = gk.quantize_weight(w, fmt, 128)
        layers = [qw] + [gk.quantize_weight(torch.randn_like(w) * 0.02, fmt, 128) for _ in range(LAYERS - 1)]
        for M in (1, 16, 64):
            x = torch.randn(M, K, device=DEV).bfloat16()
            best = None
            # ranked by their time in a graph of calls on distinct weights, as a decode step runs them
            # (an eager call's time on a machine with slow launches is mostly the launch)
            for cfg in (
                ql_candidates(M, N, K, fmt) if TUNE else [quant.quant_linear_config(M, N, K, fmt, 128)]
            ):
                g = graph_calls_ms(
                    quant.quant_linear_triton, [((x, q, None, cfg), {}) for q in layers], rep=50
                )
                if best is None or g < best[0]:
                    best = (g, cfg)
            g, cfg = best
            ms = bench_ms(quant.quant_linear_triton, x, qw, None, cfg, rep=100)
            tuned.setdefault("quant_linear", {}).setdefault(f"N={N},K={K},fmt={fmt}", {})[str(M)] = cfg
            ref_ms = bench_ms(quant.quant_linear_reference, x, qw, rep=50)
            rows.append(
                row(
                    "qlinear",
                    f"N={N},K={K},{fmt}",
                    M,
                    qw.nbytes(),
                    ms,
                    ref_ms,
                    copy_bw,
                    {"config": cfg},
                    g_ms=g,
                )
            )


def ql_candidates(M, N, K, fmt) -> list[dict]:
    """tl.dot tiles (BLOCK_N, BLOCK_K, num_warps, num_stages), then for quantized weights at up to 16 rows
    GEMV tiles (BLOCK_N, BLOCK_K, SPLIT_K, num_warps), int8 / int4 each DP4A way."""
    base = quant.quant_linear_config(M, N, K, fmt, 128)
    dot_base = base if "BLOCK_M" in base else {**quant._DEFAULT, "BLOCK_K": 128 if fmt == "int4" else 256}
    out = [base, dot_base]
    for bn, bk, w, st in ((32, 256, 4, 4), (16, 256, 4, 4), (64, 128, 4, 4)):
        bk = min(bk, 128) if fmt == "int4" else bk
        out.append({**dot_base, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st})
    if M <= 64:  # a few rows: the tl.dot kernel with K split too, so that a tall weight fills the SMs
        for (bn, bk), split in itertools.product(
            ((32, 128), (64, 128), (128, 128), (64, 256)), (2, 4, 8, 16)
        ):
            bk = min(bk, 128) if fmt == "int4" else bk
            out.append({**dot_base, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_stages": 3})
    if fmt == "bf16" or M > 16:
        return [c for i, c in enumerate(out) if c not in out[:i]]
    gemv_base = linear_gemv.linear_gemv_config(M, N, K, fmt)
    tiles = ((32, 512, 8, 4), (64, 256, 16, 4), (32, 256, 16, 2), (16, 1024, 4, 4), (64, 512, 8, 8),
             (32, 1024, 4, 4), (16, 512, 8, 4), (128, 256, 16, 8), (32, 2048, 2, 4))  # fmt: skip
    for bn, bk, split, w in tiles:
        cand = {**gemv_base, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": w}
        out += [{**cand, "DP4A": 1}, {**cand, "DP4A": 0}] if fmt in ("int8", "int4") else [cand]
    return [c for i, c in enumerate(out) if c not in out[:i]]


# A decode layer's dense projections at batch 1-4 (N outputs, K inputs), fused as hetero.layers runs them
PROJECTIONS = (
    ("qwen3-30b-a3b q/k/v", 5120, 2048),
    ("qwen3-30b-a3b o", 2048, 4096),
    ("deepseek-v2-lite q/kv_a", 3648, 2048),
    ("deepseek-v2-lite o", 2048, 2048),
    ("deepseek-v2-lite shared gate/up", 5632, 2048),
    ("deepseek-v2-lite shared down", 2048, 2816),
    ("deepseek-v3 q_a/kv_a", 2112, 7168),
    ("deepseek-v3 q_b", 24576, 1536),
    ("deepseek-v3 o", 7168, 16384),
    ("deepseek-v3 shared gate/up", 4096, 7168),
    ("deepseek-v3 shared down", 7168, 2048),
)


def bench_projections(copy_bw: float, rows: list, tuned: dict) -> None:
    """bf16 weights through cuBLAS (what a bf16 plan runs) next to an FP8 checkpoint's own e4m3 bytes
    and 128 x 128 block scales through the GEMV path, in graphs of LAYERS calls on distinct weights."""
    for name, N, K in PROJECTIONS:
        dense = [torch.randn(N, K, device=DEV).bfloat16() * 0.02 for _ in range(LAYERS)]
        blocks = [
            gk.fp8_blocks(w.to(torch.float8_e4m3fn), torch.rand(-(-N // 128), -(-K // 128), device=DEV), 128)
            for w in dense
        ]
        for M in (1, 4, 16, 2048):
            x = torch.randn(M, K, device=DEV).bfloat16()
            ref_ms = graph_calls_ms(torch.nn.functional.linear, [((x, w), {}) for w in dense])
            if M > 16:  # a prefill chunk: the weight dequantized in slices, then cuBLAS (quant_linear's way)
                g = graph_calls_ms(quant.dequant_linear, [((x, q), {}) for q in blocks])
                rows.append(
                    row(
                        "proj",
                        f"{name} fp8 dequantized + cuBLAS",
                        M,
                        blocks[0].nbytes(),
                        g,
                        ref_ms,
                        copy_bw,
                        g_ms=g,
                    )
                )
            rows.append(row("proj", f"{name} bf16", M, N * K * 2, ref_ms, None, copy_bw, g_ms=ref_ms))
            best = None
            cands = (
                ql_candidates(M, N, K, "fp8")
                if TUNE
                else [quant.quant_linear_config(M, N, K, "fp8", 128, True)]
            )
            for cfg in cands:  # the tl.dot kernel (16-row tiles, padded) competes at every size
                g = graph_calls_ms(
                    quant.quant_linear_triton, [((x, q, None, cfg), {}) for q in blocks], rep=50
                )
                if best is None or g < best[0]:
                    best = (g, cfg)
            g, cfg = best
            tuned.setdefault("quant_linear", {}).setdefault(f"N={N},K={K},fmt=fp8", {})[str(M)] = cfg
            rows.append(
                row(
                    "proj",
                    f"{name} fp8 blocks",
                    M,
                    blocks[0].nbytes(),
                    g,
                    ref_ms,
                    copy_bw,
                    {"config": cfg},
                    g_ms=g,
                )
            )


# Routers at decode sizes: (name, experts, hidden, float logits, score-correction bias, select_experts keywords)
ROUTERS = (
    (
        "qwen3-30b-a3b",
        128,
        2048,
        False,
        False,
        dict(top_k=8, scoring="softmax", method="greedy", renorm=True),
    ),
    ("deepseek-v2-lite", 64, 2048, True, False, dict(top_k=6, scoring="softmax", method="greedy")),
    (
        "deepseek-v3",
        256,
        7168,
        True,
        True,
        dict(top_k=8, scoring="sigmoid", method="noaux_tc", n_group=8, topk_group=4, renorm=True, scale=2.5),
    ),
)


def _two_kernel_route(x, w, bias, float_logits, **kw):
    from gpu_kernels import router

    return router.select_experts(router.router_logits_reference(x, w, float_logits), bias, **kw)


def bench_route(copy_bw: float, rows: list) -> None:
    """The one-kernel router (logits, then the last program of a row picks) per launch setting, next to
    a cuBLAS product followed by select_experts' kernel."""
    from gpu_kernels import router

    for name, E, H, float_logits, with_bias, kw in ROUTERS:
        weights = [torch.randn(E, H, device=DEV).bfloat16() * 0.05 for _ in range(LAYERS)]
        bias = torch.randn(E, device=DEV) * 0.1 if with_bias else None
        for T in (1, 4):
            x = torch.randn(T, H, device=DEV).bfloat16()
            ref = graph_calls_ms(_two_kernel_route, [((x, w, bias, float_logits), kw) for w in weights])
            for warps in (1, 2, 4):
                cfg = {"num_warps": warps}
                g = graph_calls_ms(
                    router.route_experts_triton,
                    [((x, w, bias), dict(float_logits=float_logits, config=cfg, **kw)) for w in weights],
                )
                rows.append(
                    row("route", f"{name} {cfg}", T, E * H * 2, g, ref, copy_bw, {"config": cfg}, g_ms=g)
                )


def cpu_name() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor()


def main() -> None:
    global TUNE, MOE_BATCHES, MOE_FORMATS, KERNEL_TIMES, READ_CEILING
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="gqa,mla,moe,qlinear", help="of gqa,mla,moe,qlinear,proj,route")
    ap.add_argument(
        "--save-configs",
        metavar="RESULT_JSON",
        help="store the tuned configs of an earlier run's JSON in gpu_kernels/configs and exit (no GPU needed)",
    )
    ap.add_argument("--no-tune", action="store_true", help="time the shipped configs only, no candidates")
    ap.add_argument("--moe-batches", type=int, nargs="+", default=list(MOE_BATCHES), help="fused-MoE tokens")
    ap.add_argument("--moe-formats", nargs="+", default=list(MOE_FORMATS), choices=MOE_FORMATS)
    ap.add_argument(
        "--kernel-times",
        action="store_true",
        help="profile each attention / MoE row's kernels inside its graph",
    )
    ap.add_argument(
        "--no-read-ceiling",
        action="store_true",
        help="leave out each row's bare read of the same bytes in the same graph timing",
    )
    args = ap.parse_args()
    TUNE, KERNEL_TIMES, READ_CEILING = not args.no_tune, args.kernel_times, not args.no_read_ceiling
    MOE_BATCHES, MOE_FORMATS = tuple(args.moe_batches), tuple(args.moe_formats)
    if args.save_configs:
        run = json.loads(Path(args.save_configs).read_text())
        arch = {run["card"]: run["arch"]} if "arch" in run else None
        for kernel, by_device in run["tuned_configs"].items():
            print(f"{kernel}: {save_configs(kernel, by_device, arch)}")
        return
    torch.manual_seed(0)
    card = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth()
    print(f"{card}: device-to-device copy {copy_bw:.0f} GB/s (read + write)", flush=True)
    rows: list = []
    tuned: dict = {}
    only = args.only.split(",")
    if "gqa" in only:
        bench_gqa(copy_bw, rows)
    if "mla" in only:
        bench_mla(copy_bw, rows)
    if "moe" in only:
        bench_moe(copy_bw, rows, tuned)
    if "qlinear" in only:
        bench_quant_linear(copy_bw, rows, tuned)
    if "proj" in only:
        bench_projections(copy_bw, rows, tuned)
    if "route" in only:
        bench_route(copy_bw, rows)
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower().replace("nvidia", "")).strip("-")
    out = Path(args.out) / f"gpu_kernels-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "card": card,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "arch": "{}.{}".format(*torch.cuda.get_device_capability()),
        "copy_GBps": copy_bw,
        "rows": rows,
        "graph_errors": sorted(set(GRAPH_ERRORS)),
        "tuned_configs": {k: {card: v} for k, v in tuned.items()},
    }
    out.write_text(json.dumps(result, indent=1))

    print(f"\n{card} | {result['cpu']} | copy bandwidth {copy_bw:.0f} GB/s")
    print(
        f"{'kernel':10s} {'shape':40s} {'batch':>5s} {'us':>9s} {'GB/s':>7s} {'%copy':>6s} {'ref us':>9s} {'x ref':>6s}"
        f" {'graph us':>9s} {'%copy':>6s} {'of read':>7s}  (graph: per call, {LAYERS} calls a graph; of read: a"
        " bare read of the same bytes in the same timing over the call)"
    )
    for r in rows:
        ref = "" if r["ref_ms"] is None else f"{r['ref_ms'] * 1e3:9.1f}"
        sp = "" if r["speedup_vs_ref"] is None else f"{r['speedup_vs_ref']:6.1f}"
        print(
            f"{r['kernel']:10s} {r['shape']:40s} {r['batch']:5d} {r['ms'] * 1e3:9.1f} {r['GB/s']:7.0f} "
            f"{r['pct_copy']:6.1f} {ref:>9s} {sp:>6s} {r.get('graph_ms', float('nan')) * 1e3:9.1f} {r.get('graph_pct_copy', float('nan')):6.1f}"
            f" {r.get('graph_over_read', float('nan')):7.2f}"
        )
    for err in sorted(set(GRAPH_ERRORS)):
        print(f"graph capture failed: {err[:300]}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
