"""What bringing the CPU experts' output back costs inside a decode graph: a copy-engine node against
the fetch kernel (gpu_kernels.handoff.fetch_host), between the host-flag wait before it and the
add + RMSNorm after it, as each MoE layer of a captured decode step has them.

A graph of LAYERS such links (wait on a page-locked flag the host set beforehand, bring back a
[T, H] float32 row, add it into the residual and normalize) is replayed REPS times per variant,
alternating; the time of a link is the replay's over LAYERS. The flags are set before each replay,
so no wait waits: what remains is the nodes and the dependencies between them.

Run on a CUDA machine: python benchmarks/handback.py [--hidden 2048] [--tokens 1] [--out DIR]
Prints a table last and writes handback-<gpu>.json under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from gpu_kernels import handoff  # noqa: E402
from gpu_kernels.host_flag import host_flags, wait_host_flag  # noqa: E402
from gpu_kernels.norm import Parts, add_rms_norm  # noqa: E402

LAYERS = 48
REPS = 50
VARIANTS = {"copy_engine": 0, "kernel": 1 << 20}  # FETCH_MAX_BYTES


def build(fetch_bytes: int, rows: list[torch.Tensor], x: torch.Tensor, flags: torch.Tensor):
    """The graph of LAYERS links bringing back ``rows`` (page-locked, one per link) into x's residual."""
    handoff.FETCH_MAX_BYTES = fetch_bytes
    dev = x.device
    w = torch.ones(x.shape[-1], device=dev, dtype=torch.bfloat16)

    def links():
        h = x
        for i, row in enumerate(rows):
            wait_host_flag(flags, i, dev)
            part = handoff.fetch_host(row, dev)
            h, _ = add_rms_norm(h, Parts((part,), torch.bfloat16, dev), w, 1e-6)
        return h

    side = torch.cuda.Stream(dev)
    with torch.cuda.stream(side):  # compiled and warmed outside the capture
        flags.fill_(1)
        links()
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = links()
    return graph, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    flags = host_flags(LAYERS)
    torch.manual_seed(0)
    rows = [torch.randn(args.tokens, args.hidden).pin_memory() for _ in range(LAYERS)]
    x = torch.randn(args.tokens, args.hidden, device=dev, dtype=torch.bfloat16)
    graphs = {name: build(b, rows, x, flags) for name, b in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(REPS):
        for name, (graph, _) in graphs.items():
            flags.fill_(1)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) * 1e3 / LAYERS)
    # The same rows in, so the same numbers out either way: each variant's last replay.
    a, b = (graphs[n][1].float() for n in VARIANTS)
    same = bool(torch.equal(a, b))
    gpu = torch.cuda.get_device_name(dev)
    rows = {
        n: {"us_per_link_median": statistics.median(t), "us_per_link_min": min(t)} for n, t in times.items()
    }
    base = rows["copy_engine"]["us_per_link_median"]
    res = {
        "machine": gpu,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "layers": LAYERS,
        "reps": REPS,
        "same_output": same,
        "rows": rows,
        "kernel_over_copy_engine": rows["kernel"]["us_per_link_median"] / base,
    }
    out = Path(args.out) / f"handback-{gpu.replace(' ', '_').lower()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
    print(f"\n{gpu}: a flag wait, the CPU result ({args.tokens} x {args.hidden} float32) back, add + RMSNorm")
    print(f"  {'variant':<12} {'us a link (median)':>19} {'min':>7}")
    for n, r in rows.items():
        print(f"  {n:<12} {r['us_per_link_median']:19.2f} {r['us_per_link_min']:7.2f}")
    print(f"  kernel / copy engine: {res['kernel_over_copy_engine']:.2f}; same output: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
