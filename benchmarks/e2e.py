"""End-to-end decode and prefill of an offloaded checkpoint against its rooflines and the plan.

    python benchmarks/e2e.py MODEL_DIR --gpu-mem 6GiB [--experts int4 int8] [--gpus 2]

Per expert format, in one process: decode tokens/s (batch 1, 512-token prompt, 128 tokens) over
the roofline (routed-expert bytes read from RAM per token / measured CPU read bandwidth, the GPU
part taken as overlapped; also over the same roofline with the read bandwidth probed again right before
and after the timed decode, column "adj"), prefill tokens/s of a 2048-token prompt over the bound (per layer the
faster of streaming its RAM experts over PCIe and computing them on the CPU), and the planner's
predictions next to both. Prints a table last; writes JSON under benchmarks/results/.

``--gpus N`` splits the GPU part over N GPUs (one process each, ``--gpu-mem`` per GPU); rank 0
measures, prints and writes ``e2e-MODEL-gpusN-GPU.json``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

# benchmarks/gpu_kernels.py would shadow the gpu_kernels package for scripts run from here.
sys.path = [p for p in sys.path if Path(p).resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from cpu_kernels.threads import separate_openmp  # noqa: E402
from hetero.bench import cap_device_memory, ram_expert_bytes_per_token, run_bench  # noqa: E402
from hetero.calibrate import ExpertCounts, ram_shares  # noqa: E402
from hetero.distributed import SINGLE, Parallel, launch, rank0_first  # noqa: E402
from hetero.experts import HybridExperts, set_pcie_share  # noqa: E402
from hetero.graphs import LAUNCH_MODES  # noqa: E402
from hetero.runtime import RuntimeOptions, bulk, load_runtime  # noqa: E402
from placement import detect  # noqa: E402
from placement.hardware import probe_cpu_bandwidth  # noqa: E402
from placement.units import parse_size  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def bound_rates(prof) -> dict:
    """The measured rates prefill_bound_s takes, from a hardware profile."""
    return {
        "cpu_bw": prof.cpu_read_bw,
        "cpu_flops": prof.cpu_flops,
        "pcie": prof.h2d_pinned_bw,
        "gpu_flops": prof.gpu.bf16_flops if prof.gpu else 1e12,
    }


def prefill_bound_s(model, spec, tokens: int, rates) -> float:
    """Sum over layers of min(stream the layer's RAM experts, compute them on the CPU)."""
    total = 0.0
    flops_per_pair = 2 * 3 * spec.hidden_size * spec.moe_intermediate_size
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if not (isinstance(experts, HybridExperts) and experts.cpu is not None):
            continue
        packed = experts.cpu.packed
        frac = packed.E / experts.num_experts
        pairs = tokens * spec.top_k * frac
        stream = max(packed.nbytes / rates["pcie"], pairs * flops_per_pair / rates["gpu_flops"])
        cpu = max(packed.nbytes / rates["cpu_bw"], pairs * flops_per_pair / rates["cpu_flops"])
        total += min(stream, cpu)
    return total


def stream_copy_probe(streamed: list, reps: int = 3) -> dict:
    """What streamed prefill's copies reach: each layer's packed experts copied chunk by chunk from
    where they lie (page-locked in place) into the staging buffers, as a prefill copies them but with
    no computation between, best of ``reps`` a layer; beside one 128 MB copy from a cudaHostAlloc
    buffer (how the hardware profile's pinned rate, and so the prefill bound, is measured: 256 MB
    there). With each layer's share of its host arrays backed by transparent huge pages: a DMA over
    4 KiB pages may read slower than one over 2 MiB pages."""
    if not streamed or not streamed[0].cuda or not streamed[0].pinned:
        return {}
    try:
        with torch.inference_mode():  # the staging buffers were made as inference tensors
            return _stream_copy_probe(streamed, reps)
    except (RuntimeError, torch.OutOfMemoryError) as err:  # a diagnostic: never the run's end
        print(f"streamed copies: probe failed: {err}")
        return {"error": str(err)[:300]}


def _best_rate(nbytes: int, copy, stream, reps: int) -> float:
    """Bytes a second of copy() on ``stream``, timed by CUDA events there, best of ``reps``."""
    best = 0.0
    for _ in range(reps):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        copy()
        end.record(stream)
        torch.cuda.synchronize()
        best = max(best, nbytes / (start.elapsed_time(end) * 1e-3))
    return best


def huge_page_share(tensors: list[torch.Tensor], smaps: list[tuple[int, int, float]]) -> float:
    """Share of these host tensors' bytes that lie in mappings backed by huge pages, each mapping
    counted by its AnonHugePages over its size (smaps: (start, end, that share) per mapping)."""
    total = huge = 0.0
    for t in tensors:
        lo = t.data_ptr()
        hi = lo + t.numel() * t.element_size()
        total += hi - lo
        for a, b, share in smaps:
            if a < hi and lo < b:
                huge += (min(b, hi) - max(a, lo)) * share
    return huge / total if total else 0.0


def read_smaps(path: str = "/proc/self/smaps") -> list[tuple[int, int, float]]:
    """(start, end, share backed by anonymous huge pages) of each mapping of this process."""
    out: list[tuple[int, int, float]] = []
    try:
        with open(path) as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    a, b = (int(v, 16) for v in head.split("-"))
                    out.append((a, b, 0.0))
                elif head == "AnonHugePages:" and out:
                    a, b, _ = out[-1]
                    out[-1] = (a, b, int(line.split()[1]) * 1024 / max(b - a, 1))
    except OSError:
        return []
    return out


def _stream_copy_probe(streamed: list, reps: int) -> dict:
    smaps = read_smaps()
    layers = []
    for s in streamed:
        spans = s._spans()
        nbytes = sum(t.numel() * t.element_size() for t in s.host.values())
        rate = _best_rate(
            nbytes, lambda s=s, spans=spans: [s._fetch(lo, hi) for lo, hi in spans], s.copy_stream, reps
        )
        layers.append((rate / 1e9, huge_page_share(list(s.host.values()), smaps)))
    s = streamed[0]
    src = torch.empty(128 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=s.device)
    with torch.cuda.stream(s.copy_stream):
        alloc = _best_rate(src.numel(), lambda: dst.copy_(src, non_blocking=True), s.copy_stream, reps)
    rates = sorted(r for r, _ in layers)
    out = {
        "layer_bytes": sum(t.numel() * t.element_size() for t in s.host.values()),
        "chunks": len(s._spans()),
        "stream_GBs": rates[len(rates) // 2],  # the median layer
        "stream_GBs_min": rates[0],
        "stream_GBs_max": rates[-1],
        "host_alloc_GBs": alloc / 1e9,
        "huge_page_share": sum(h for _, h in layers) / len(layers),
    }
    print("streamed copies:", {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()})
    out["layers"] = [{"GBs": r, "huge_page_share": h} for r, h in layers]  # in layer order
    return out


def cpu_layer_probe(model, spec, calls: int = 100) -> dict:
    """One MoE layer's CPU kernel alone, one token whose experts all sit in RAM: ms per call and GB/s
    of weights read, with the arrays as loaded and as a fresh copy, at all and at half the threads."""
    import dataclasses

    import numpy as np

    import cpu_kernels

    layer = next(
        (
            m.mlp.experts
            for m in model.model.layers
            if isinstance(getattr(m.mlp, "experts", None), HybridExperts)
        ),
        None,
    )
    if layer is None or layer.cpu is None:
        return {}
    packed = layer.cpu.packed
    fresh = dataclasses.replace(
        packed, **{f: np.copy(getattr(packed, f)) for f in ("gate_up", "down", "gate_up_scale", "down_scale")}
    )
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, spec.hidden_size), dtype=np.float32)
    w = np.full((1, spec.top_k), 1.0 / spec.top_k, np.float32)
    out = np.empty_like(x)
    k = min(spec.top_k, packed.E)
    nbytes = k * packed.expert_nbytes()
    res = {"experts_read": k, "bytes": nbytes}
    full = cpu_kernels.get_num_threads()
    for name, p, threads in (
        ("loaded", packed, full),
        ("copy", fresh, full),
        ("loaded_half", packed, max(1, full // 2)),
    ):
        ids = [rng.choice(packed.E, k, replace=False).astype(np.int32)[None] for _ in range(calls)]
        cpu_kernels.fused_moe(x, ids[0], w, p, out=out, threads=threads)
        t = time.perf_counter()
        for i in range(calls):
            cpu_kernels.fused_moe(x, ids[i], w, p, out=out, threads=threads)
        ms = (time.perf_counter() - t) / calls * 1e3
        res[name] = {"threads": threads, "ms": ms, "GBs": nbytes / ms / 1e6}
    return res


def profile_tables(
    rt, prefill_len: int, prompt_len: int, show: bool = True, trace: str | None = None
) -> None:
    """Top operators by device and by host time: one prefill, then 16 decode steps (printed if
    ``show``); ``trace``: write each part's Chrome trace there ({part} in the name)."""
    from torch.profiler import ProfilerActivity, profile

    from hetero.sampling import SamplingParams

    vocab = min(rt.spec.vocab_size, rt.tokenizer.vocab_size)
    g = torch.Generator().manual_seed(1)
    engine = rt.engine
    for name, plen, gen in (("prefill", prefill_len, 1), ("decode", prompt_len, 17)):
        seq = engine.add_request(
            torch.randint(0, vocab, (plen,), generator=g).tolist(),
            SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True),
        )
        if name == "decode":
            engine.step()  # the prompt, outside the profile
        cuda = torch.cuda.is_available()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            while not seq.finished:
                engine.step()
            if cuda:
                torch.cuda.synchronize()
        if trace:
            prof.export_chrome_trace(trace.format(part=name))
        if not show:
            continue
        avg = prof.key_averages()
        for key in ("self_cuda_time_total", "self_cpu_time_total") if cuda else ("self_cpu_time_total",):
            print(f"-- {name}: top operators by {key}")
            print(avg.table(sort_by=key, row_limit=12, max_name_column_width=48))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--gpu-mem", default="6GiB")
    ap.add_argument("--experts", nargs="+", default=["int4", "int8"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--tag", default="")
    ap.add_argument(
        "--gpu-weights",
        nargs="+",
        default=["auto"],
        help="GPU weight formats (auto, bf16, fp8, int8, int4): each expert format runs with each, one after another",
    )
    ap.add_argument(
        "--pcie-share",
        type=float,
        default=0.0,
        help="GPU's share of each decode step's RAM experts, read over PCIe; above 0 the row also "
        "decodes with none, side by side",
    )
    ap.add_argument(
        "--hf-baseline", action="store_true", help="also time transformers + accelerate (16 tokens)"
    )
    ap.add_argument(
        "--profile", action="store_true", help="print the top operators of a prefill and of decode steps"
    )
    ap.add_argument(
        "--trace", default=None, help="with --profile: Chrome trace files, {part} = prefill|decode"
    )
    ap.add_argument(
        "--gpus", type=int, default=1, help="split the GPU part over N GPUs (--gpu-mem is per GPU)"
    )
    ap.add_argument(
        "--freq",
        default=None,
        help="expert-activation counts (hetero calibrate): the plan puts the most used experts on the GPU",
    )
    ap.add_argument(
        "--defer",
        type=int,
        default=0,
        help="also decode with each token's N lightest RAM experts deferred (launched upfront), and "
        "report what that does to the logits",
    )
    args = ap.parse_args(argv)
    if args.gpus > 1:
        return launch(measure, args.gpus, args)[0]
    return measure(SINGLE, args)


def _deferred_decode(rt, args: argparse.Namespace) -> dict:
    """Decode with args.defer experts a token deferred, the graphs launched upfront (the pairing that
    overlaps the late experts with the next layer's GPU work), then the logits against no deferral."""
    import importlib.util

    from hetero.moe import defer_experts
    from hetero.sampling import SamplingParams

    spec = importlib.util.spec_from_file_location(
        "decode_profile", Path(__file__).with_name("decode_profile.py")
    )
    decode_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode_profile)
    engine, launch = rt.engine, rt.engine.graphs.launch
    prompt = list(range(1000, 1064))
    try:
        engine.graphs.launch = "upfront"
        defer_experts(engine.model, args.defer)
        engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # captures
        tok_s = run_bench(rt, args.prompt_len, args.gen, 1).decode_tok_s
    finally:
        defer_experts(engine.model, 0)
        engine.graphs.launch = launch
    (accuracy,) = decode_profile.deferral_accuracy(engine, prompt, 32, [args.defer])
    return {"defer": args.defer, "tok_s": tok_s, "accuracy": accuracy}


def _deferred_row(deferred: dict | None, roof: float, roof_adjacent: float) -> dict:
    if deferred is None:
        return {}
    return {
        "decode_defer": deferred["defer"],  # experts a token, launched upfront
        "decode_defer_tok_s": deferred["tok_s"],
        "decode_defer_over_roofline": deferred["tok_s"] / roof,
        "decode_defer_over_adjacent_roofline": deferred["tok_s"] / roof_adjacent,
        "decode_defer_accuracy": deferred["accuracy"],  # greedy tokens kept, logits' relative change
    }


def adjacent_read_bw(prof, par: Parallel) -> float:
    """The profile's CPU read-bandwidth probe run again now (rank 0; the others keep the profile's)."""
    if not par.is_first:
        return prof.cpu_read_bw
    return bulk(probe_cpu_bandwidth, prof.physical_cores, prof.ram_available) or prof.cpu_read_bw


def measure(par: Parallel, args: argparse.Namespace) -> int:
    """Every rank loads and runs the same steps; rank 0 alone probes, prints and writes."""
    gpu_mem = parse_size(args.gpu_mem)
    cap_device_memory(gpu_mem, par.rank)
    if torch.cuda.is_available():
        separate_openmp()  # before any probe starts Numba's threads, as load_runtime does
    prof = rank0_first(par, lambda: bulk(detect))  # measured once, cached for the other ranks
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    rates = bound_rates(prof)
    rows = []
    machine = {
        "gpu": gpu_name,
        "gpu_mem_cap": args.gpu_mem,
        "cpu": prof.cpu_model,
        "cores": prof.physical_cores,
        "cpu_read_bw_GBs": prof.cpu_read_bw / 1e9,  # the highest probed in the run, in the end
        "cpu_read_bw_start_GBs": prof.cpu_read_bw / 1e9,  # the profile's at the start
        "pcie_pinned_GBs": prof.h2d_pinned_bw / 1e9,
        "host": platform.node(),
        "gpus": args.gpus,
    }
    name = (
        Path(args.model).name
        + (f"-gpus{args.gpus}" if args.gpus > 1 else "")
        + (f"-{args.tag}" if args.tag else "")
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"e2e-{name}-{gpu_name.replace(' ', '_')}.json"
    for fmt, gpu_weights in itertools.product(args.experts, args.gpu_weights):
        opts = RuntimeOptions(
            offload=True,
            # The plan gets the cap less 1 GiB: headroom for streamed-expert chunks and the allocator.
            gpu_mem=gpu_mem - (1 << 30),
            experts=fmt,
            gpu_weights=gpu_weights,
            max_batch=1,
            max_model_len=max(args.prompt_len + args.gen, args.prefill_len) + 16,
            max_step_tokens=args.prefill_len,
            # Each timed prompt is computed in full: random prompts drawn from one seed share
            # their first tokens, which the prefix cache would otherwise serve.
            prefix_caching=False,
            pcie_share=args.pcie_share,
            expert_freq=args.freq,
        )
        rt = load_runtime(args.model, opts, par)
        # the read probe again right before and after the timed decode: on a VM the bandwidth drifts
        # between the profile's probe and runs minutes later (ratios to it moved by a third across runs)
        # One untimed decode first: right after loading (and page-locking the streamed experts) the
        # host was still settling, and the first timed decode came out 7-60% under the later ones
        # (Qwen3-30B-A3B int4: 25.0 tok/s, then 57-64 in every launch mode)
        run_bench(rt, args.prompt_len, args.gen, 1)
        bw_before = adjacent_read_bw(prof, par)
        dec = run_bench(rt, args.prompt_len, args.gen, 1)
        adjacent = (bw_before, adjacent_read_bw(prof, par))
        # Twice, the second timed: the first pays one-time costs of a new shape (kernel selection).
        first = run_bench(rt, args.prefill_len, 2, 1, seed=1)
        reading = sum(t.name == "hetero-readahead" for t in threading.enumerate())
        # The best of two timed runs, so that a one-off stall of the host during one does not set the
        # row (prefill ratios of one code moved from 0.58 to 0.88 across instances, one run each)
        pres = [run_bench(rt, args.prefill_len, 2, 1) for _ in range(2)]
        pre = max(pres, key=lambda r: r.prefill_tok_s)
        print(f"{fmt} prefill {args.prefill_len}: first {first.prefill_tok_s:.0f} tok/s "
              f"{first.prefill_ram_experts}, then {pre.prefill_tok_s:.0f} {pre.prefill_ram_experts} "
              f"({reading} read-ahead threads still running)", flush=True)  # fmt: skip
        by_launch: dict[str, float] = {}
        if rt.engine.graphs is not None:
            # The same graphs driven the other ways (hetero.graphs), then the default once more, so
            # that drift shows against all. The row's decode is the default's first run.
            default = rt.engine.graphs.launch
            for mode in [m for m in LAUNCH_MODES if m != default] + [default]:
                rt.engine.graphs.launch = mode
                key = f"{mode}_again" if mode == default else mode
                by_launch[key] = run_bench(rt, args.prompt_len, args.gen, 1).decode_tok_s
            # and each step run to its tokens before the next is launched (EngineConfig.overlap off)
            overlap = rt.engine.config.overlap
            rt.engine.config.overlap = not overlap
            by_launch["one_at_a_time" if overlap else "overlap"] = run_bench(
                rt, args.prompt_len, args.gen, 1
            ).decode_tok_s
            rt.engine.config.overlap = overlap
        deferred = _deferred_decode(rt, args) if args.defer and rt.engine.graphs is not None else None
        share = rt.plan.cost_inputs.pcie_share if rt.engine.graphs is not None else 0.0
        pcie_off = None
        if share > 0:
            # The same decode with the CPU computing every RAM expert, then
            # the default again: side by side with the GPU reading its share over PCIe.
            runs = {}
            for s in (0.0, share):
                set_pcie_share(rt.engine.model, s)  # the captured graphs read it
                runs[s] = run_bench(rt, args.prompt_len, args.gen, 1).decode_tok_s
            pcie_off, by_launch["pcie_again"] = runs[0.0], runs[share]
        graphs, rt.engine.graphs = rt.engine.graphs, None  # the same decode, kernels launched one by one
        # its decode steps' expert choices counted (hooks see eager forwards only): how many of them
        # read RAM experts, against uniform routing's share
        counts = ExpertCounts(rt.engine.model, max_tokens=1)
        eager = run_bench(rt, args.prompt_len, min(args.gen, 32), 1)
        counts.detach()
        shares, uniform = ram_shares(rt.engine.model, counts.to_json()), ram_shares(rt.engine.model)
        rt.engine.graphs = graphs
        del graphs
        probe = bulk(cpu_layer_probe, rt.engine.model, rt.spec)
        streamed = [
            m.mlp.experts.streamed
            for m in rt.engine.model.model.layers
            if isinstance(getattr(m.mlp, "experts", None), HybridExperts)
            and m.mlp.experts.streamed is not None
        ]
        pinned = sum(s.pinned_bytes for s in streamed), sum(s.packed.nbytes for s in streamed)
        copies = stream_copy_probe(streamed)
        if args.profile and fmt == args.experts[0]:
            profile_tables(rt, args.prefill_len, args.prompt_len, show=par.is_first, trace=args.trace)
        # The roofline at the highest read bandwidth probed in the run so far (the profile's, the
        # probes beside the kernels' rates at load, the adjacent ones): a probe only comes out low
        # by chance, and a start probe on these VMs read 20-60% under the later ones.
        read_bw = max(rates["cpu_bw"], rt.plan.profile.get("cpu_read_bw") or 0.0, *adjacent)
        rates["cpu_bw"] = read_bw
        per_token = ram_expert_bytes_per_token(rt.engine.model, rt.spec.top_k)
        roof = rates["cpu_bw"] / per_token if per_token else float("inf")
        routed = ram_expert_bytes_per_token(rt.engine.model, rt.spec.top_k, shares)
        roof_routed = sum(adjacent) / 2 / routed if routed else float("inf")
        roof_adjacent = sum(adjacent) / 2 / per_token if per_token else float("inf")
        # both links at their measured rates: the CPU's reads and the GPU's over PCIe, added up
        both = (rates["cpu_bw"] + rates["pcie"]) / per_token if per_token else float("inf")
        bound_s = prefill_bound_s(rt.engine.model, rt.spec, args.prefill_len, rates)
        bound = args.prefill_len / bound_s if bound_s else float("inf")
        pred = rt.plan.predicted
        rows.append(
            {
                "experts": fmt,
                "gpu_weights": rt.plan.gpu_weights + (" as stored" if rt.plan.fp8_as_stored else ""),
                "decode_tok_s": dec.decode_tok_s,
                "decode_roofline_tok_s": roof,
                "cpu_read_bw_GBs": read_bw / 1e9,  # the roofline's
                "decode_over_roofline": dec.decode_tok_s / roof,
                "cpu_read_bw_adjacent_GBs": [bw / 1e9 for bw in adjacent],  # probed before, after
                "decode_over_adjacent_roofline": dec.decode_tok_s / roof_adjacent,
                # the roofline with the RAM experts' share of the choices an eager decode made (its
                # routing, not uniform), at the adjacent probes
                "ram_expert_bytes_per_token_routed": routed,
                "ram_choice_share_by_layer": {str(k): v for k, v in shares.items()},
                "ram_choice_share_uniform": sum(uniform.values()) / max(len(uniform), 1),
                "decode_over_routed_roofline": dec.decode_tok_s / roof_routed,
                "pcie_share": share,
                "decode_pcie_off_tok_s": pcie_off,  # the CPU computing every RAM expert, same run
                "decode_over_cpu_plus_pcie_roofline": dec.decode_tok_s / both,
                "decode_eager_tok_s": eager.decode_tok_s,
                "decode_launch": rt.engine.graphs.launch if rt.engine.graphs is not None else None,
                "decode_by_launch_tok_s": by_launch,  # each way of driving the graphs, the default again last
                "graphs_over_eager": dec.decode_tok_s / eager.decode_tok_s,
                **_deferred_row(deferred, roof, roof_adjacent),
                "decode_predicted_tok_s": pred["decode_tok_s"],
                "decode_measured_over_predicted": dec.decode_tok_s / pred["decode_tok_s"],
                "prefill_tok_s": pre.prefill_tok_s,
                "prefill_bound_tok_s": bound,
                "prefill_over_bound": pre.prefill_tok_s / bound,
                "prefill_predicted_tok_s": pred["prefill_tok_s"],
                "prefill_measured_over_predicted": pre.prefill_tok_s / pred["prefill_tok_s"],
                "ttft_512_s": dec.prefill_s,
                # the CPU kernels' rates the plan was priced with (placement's cpu_kernel_bw)
                "plan_cpu_kernel_GBs": {
                    k: v / 1e9 for k, v in (rt.plan.profile.get("cpu_kernel_bw") or {}).items()
                },
                "ram_expert_bytes_per_token": per_token,
                "gpu_experts_per_layer": {str(k): len(v) for k, v in rt.plan.experts_on_gpu.items()},
                "cpu_layer_probe": probe,
                "streamed_bytes_pinned": pinned[0],
                "stream_copy_probe": copies,  # each layer's chunk copies as prefill makes them, alone
                "streamed_bytes": pinned[1],
                "decode_detail": asdict(dec),
                "prefill_detail": asdict(pre),
                "prefill_first_tok_s": first.prefill_tok_s,
                "prefill_runs_tok_s": [r.prefill_tok_s for r in pres],
            }
        )
        machine["cpu_read_bw_GBs"] = rates["cpu_bw"] / 1e9
        if par.is_first:
            out.write_text(json.dumps({"model": name, "machine": machine, "rows": rows}, indent=2))  # so far
        # Captured graphs and their memory pool go with the engine; free them before the next load.
        rt.engine.graphs = None
        del rt
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if not par.is_first:
        return 0
    if args.hf_baseline:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "hf_baseline", Path(__file__).with_name("hf_baseline.py")
        )
        hf_baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hf_baseline)
        hf = hf_baseline.hf_decode_tok_s(args.model, args.gpu_mem, args.prompt_len, 16)
        for r in rows:
            r["hf_decode_tok_s"] = hf["decode_tok_s"]
            r["decode_over_hf"] = r["decode_tok_s"] / hf["decode_tok_s"]
    out.write_text(json.dumps({"model": name, "machine": machine, "rows": rows}, indent=2))
    print(f"\nmachine: {machine}")
    if args.hf_baseline:
        print("transformers + accelerate decode: " + ", ".join(f"{r['decode_over_hf']:.1f}x" for r in rows))
    for r in rows:
        print(f"{r['experts']} CPU layer probe: {r['cpu_layer_probe']}")
        print(
            f"{r['experts']} streamed bytes page-locked: {r['streamed_bytes_pinned']} of {r['streamed_bytes']}"
        )
        if r["decode_detail"]["eager_reasons"]:
            print(f"{r['experts']} decode ran eagerly: {r['decode_detail']['eager_reasons']}")
        shares = r["ram_choice_share_by_layer"]
        if shares:
            print(
                f"{r['experts']} decode: RAM experts took {sum(shares.values()) / len(shares):.0%} of the "
                f"choices (uniform routing: {r['ram_choice_share_uniform']:.0%}); "
                f"{r['decode_over_routed_roofline']:.2f} of the roofline with that routing (adjacent probes)"
            )
        if "decode_defer" in r:
            acc = r["decode_defer_accuracy"]
            print(
                f"{r['experts']} with {r['decode_defer']} experts deferred (upfront launch): "
                f"{r['decode_defer_tok_s']:.1f} tok/s, {r['decode_defer_over_roofline']:.2f} of the roofline "
                f"({r['decode_defer_over_adjacent_roofline']:.2f} adjacent); greedy tokens as without for "
                f"{acc['same_tokens']} of {acc['of']}, logits {acc['logits_rel_median']:.3f} apart"
            )
    modes = sorted({k for r in rows for k in r["decode_by_launch_tok_s"]})
    hdr = f"{'experts':8} {'GPU weights':15} {'decode':>8} " + " ".join(f"{m:>12}" for m in modes)
    hdr += f" {'no-pcie':>8} {'eager':>8} {'roof':>8} {'ratio':>6} {'adj':>6} {'pred':>8} {'prefill':>9} {'bound':>9} {'ratio':>6} {'pred':>9}"
    print(hdr)
    for r in rows:
        by = r["decode_by_launch_tok_s"]
        print(
            f"{r['experts']:8} {r['gpu_weights']:15} {r['decode_tok_s']:8.2f} "
            + " ".join(f"{by.get(m, float('nan')):12.2f}" for m in modes)
            + f" {r['decode_pcie_off_tok_s'] or float('nan'):8.2f}"
            + f" {r['decode_eager_tok_s']:8.2f} {r['decode_roofline_tok_s']:8.2f} "
            f"{r['decode_over_roofline']:6.2f} {r['decode_over_adjacent_roofline']:6.2f} {r['decode_predicted_tok_s']:8.2f} {r['prefill_tok_s']:9.1f} "
            f"{r['prefill_bound_tok_s']:9.1f} {r['prefill_over_bound']:6.2f} {r['prefill_predicted_tok_s']:9.1f}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
