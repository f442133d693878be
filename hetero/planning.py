"""`hetero plan` and `hetero profile`, and `make_plan`, the planner entry point of the engine."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import placement
from hetero.config import PRESETS, ModelSpec, preset
from hetero.errors import HeteroError
from hetero.inventory import build_inventory
from placement import HardwareProfile, Plan, PlanError, PlanOptions, parse_rate, parse_size
from placement.units import fmt_bytes


def make_plan(
    spec: ModelSpec, profile: HardwareProfile | None = None, name: str = "", **options: Any
) -> Plan:
    """Plan ``spec`` on ``profile`` (this machine's, probed once and cached, when None).

    ``options`` are PlanOptions fields (gpu_mem, cpu_mem, context, batch, experts, ...). Without
    CUDA the GPU is a pretend 24 GiB card unless ``gpu_mem`` says otherwise.
    """
    try:
        opts = PlanOptions(**options)
        profile = profile or with_kernel_rate(placement.detect(), opts.experts)
        return placement.make_plan(build_inventory(spec, name), profile, opts)
    except TypeError as e:
        raise HeteroError(f"unknown plan option: {e}") from None
    except PlanError as e:
        raise HeteroError(str(e)) from None


def stored_fp8(spec: ModelSpec, gpus: int, device: Any = None) -> bool:
    """Whether fp8 GPU weights can be the checkpoint's own (PlanOptions.stored_fp8): it stores them
    in fp8 with square block scales, one GPU holds each weight whole (tensor parallelism would cut
    the blocks), and that GPU computes in fp8 (compute capability 8.9 or later). ``device``: the
    torch device the model loads to; None plans for this machine's first GPU, or, with no CUDA,
    for a pretend card that has fp8."""
    if not spec.fp8_blocks or gpus != 1:
        return False
    import torch

    from gpu_kernels.quant import fp8_supported

    if device is None:
        if not torch.cuda.is_available():
            return True
        device = torch.device("cuda", 0)
    return fp8_supported(torch.device(device))


def with_kernel_rate(profile: HardwareProfile, expert_format: str, again: bool = False) -> HardwareProfile:
    """``profile`` with the decode bandwidth of the CPU expert kernels in ``expert_format`` at
    batch 1 and 16, measured here once (a few seconds, plus compiling the kernel the first time)
    and cached with the profile; with ``again`` (a runtime loading onto a GPU), measured anew
    and the faster of the new and the cached rate kept. Profiles that were not probed
    (``--no-probe``) stay estimates.

    The kernels stream memory, so their rate is taken as a share of the read bandwidth probed
    next to them, applied to the profile's: a machine whose bandwidth moves (a VM's from minute to
    minute; one instance probed 87 GB/s at start, then 73-85 beside its decodes) would otherwise
    price the kernels at whatever moment they were timed in (one plan came out 23% under its
    decode that way). Where the probes next to them read faster than the profile's, the profile's
    is raised to theirs (and the cached rates of other formats with it): a probe can only come out
    low by chance; so can a kernel's (one VM's first probe in a process right after writing a
    checkpoint priced int4 at 0.57 of the read bandwidth, 0.83-0.91 on other instances), which
    is why a load measures again."""
    if not profile.measured or (expert_format in profile.cpu_kernel_bw and not again):
        return profile
    from cpu_kernels.probe import decode_bandwidth
    from placement.cost import KERNEL_PROBE_BATCHES, PROBE_EXPERTS, PROBE_TOP_K, kernel_key
    from placement.hardware import probe_cpu_bandwidth
    from placement.planner import cpu_worker_threads

    threads = sum(cpu_worker_threads(profile).values())  # the plan's workers: one core drives the GPU
    rates = dict(profile.cpu_kernel_bw)
    shape = (PROBE_EXPERTS, 2048, 1408, PROBE_TOP_K)  # V2-Lite's expert size; kernel_bw scales by routing

    def read_now() -> float | None:
        return probe_cpu_bandwidth(profile.physical_cores, profile.ram_available, seconds=0.25)

    reads = [read_now()]
    measured = {
        kernel_key(expert_format, batch): decode_bandwidth(expert_format, threads, batch, shape)
        for batch in KERNEL_PROBE_BATCHES
    }
    reads.append(read_now())
    read_bw = profile.cpu_read_bw
    if all(reads) and read_bw > 0:
        # Whatever else runs on the machine only lowers a read probe, so the highest one seen is the
        # better estimate: the profile's own may have been taken in a dip (a VM probed 76 GB/s at
        # the start of a process, right after writing a checkpoint; 94-114 in it minutes later).
        read_bw = max(read_bw, *reads)
        scale = read_bw / max(reads)  # the faster probe: a dip lowers only one of them
        measured = {k: v * scale for k, v in measured.items()}
        # the formats measured before keep their shares of the read bandwidth
        rates = {k: v * read_bw / profile.cpu_read_bw for k, v in rates.items()}
    rates.update({k: max(v, rates.get(k, 0.0)) for k, v in measured.items()})
    profile = dataclasses.replace(
        profile,
        cpu_read_bw=read_bw,
        cpu_kernel_bw=rates,
        measured=tuple(dict.fromkeys((*profile.measured, "cpu_kernel_bw"))),
    )
    placement.save_profile(profile)
    return profile


def load_spec(model: str | None) -> tuple[ModelSpec, str]:
    """A preset name or a checkpoint directory; DeepSeek-V3 when nothing is named."""
    model = model or "deepseek-v3"
    if model.lower() in PRESETS:
        return preset(model), model.lower()
    if model.endswith(".gguf") and Path(model).is_file():
        from hetero.gguf import GGUFSource

        return GGUFSource(model).spec(), Path(model).name
    if Path(model).exists():
        return ModelSpec.from_pretrained(model), Path(model).name
    raise HeteroError(
        f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory holding config.json"
    )


def model_formats(model: str | None) -> tuple[str, int] | None:
    """The expert format and group size a converted model or GGUF file was written in, if any."""
    if not model:
        return None
    if model.endswith(".gguf") and Path(model).is_file():
        from hetero.gguf import GGUFSource

        src = GGUFSource(model)
        return src.expert_format, src.group_size
    from hetero.packed import PackedModel, is_converted

    if is_converted(model):
        packed = PackedModel(model)
        return packed.expert_format, packed.group_size
    return None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="decide where each weight goes and predict the speed, loading nothing")
    p.add_argument(
        "model",
        nargs="?",
        help="a preset name, checkpoint or converted directory, or .gguf file (default deepseek-v3)",
    )
    p.add_argument(
        "--gpus", type=int, default=1, help="GPUs to split the GPU part over (--gpu-mem is per GPU)"
    )
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence to reserve KV cache for")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--experts", default="int4", choices=("int4", "int8", "bf16"), help="routed expert format")
    p.add_argument("--group-size", type=int, default=128, help="int4 quantization group")
    p.add_argument("--gpu-weights", default="auto", choices=("auto", "bf16", "fp8", "int8", "int4"))
    p.add_argument("--kv-dtype", default="bf16", choices=("bf16", "fp16", "fp8", "fp32"))
    p.add_argument("--freq", help='expert-activation counts, JSON {"layer": {"expert": count}}')
    p.add_argument("--prefill-tokens", type=int, default=2048, help="prompt length of the prefill prediction")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.add_argument("-o", "--output", help="also write the plan JSON to this file")
    _hardware_args(p)
    p.set_defaults(func=_plan_cmd)

    q = sub.add_parser("profile", help="show the detected hardware (probed once, then cached)")
    q.add_argument("--json", action="store_true")
    _hardware_args(q)
    q.set_defaults(func=_profile_cmd)


def _hardware_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hardware (override what was detected, to plan for another machine)")
    g.add_argument("--gpu-mem", help="GPU memory to use, e.g. 24GiB, 24GB, 80000MiB (G = GiB)")
    g.add_argument("--cpu-mem", help="RAM to use, e.g. 512GiB")
    g.add_argument("--gpu-name", help="plan for this card (known: H100, H200, A100, L40S, RTX 4090, ...)")
    g.add_argument("--gpu-bw", help="GPU memory bandwidth, GB/s")
    g.add_argument("--gpu-tflops", type=float, help="GPU dense bf16 TFLOP/s")
    g.add_argument("--cpu-bw", help="CPU memory read bandwidth, GB/s")
    g.add_argument("--cpu-tflops", type=float, help="CPU fp32 FMA peak, TFLOP/s")
    g.add_argument("--cpu-cores", type=int, help="physical cores")
    g.add_argument("--numa-nodes", type=int, help="NUMA nodes (cores and RAM split evenly)")
    g.add_argument("--pcie-bw", help="host-to-GPU bandwidth from pinned memory, GB/s")
    g.add_argument("--no-probe", action="store_true", help="skip measurements; use table values and defaults")
    g.add_argument("--refresh-profile", action="store_true", help="measure again instead of using the cache")


def profile_from_args(
    args: argparse.Namespace, expert_format: str = "int4"
) -> tuple[HardwareProfile, dict[str, int | None]]:
    """The profile (with the CPU kernels' rate in ``expert_format``) with command-line overrides,
    and the byte budgets the flags name."""
    try:
        gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else None
        cpu_mem = parse_size(args.cpu_mem) if args.cpu_mem else None
        prof = placement.detect(probe=not args.no_probe, refresh=args.refresh_profile)
        prof = with_kernel_rate(prof, expert_format)
        prof = prof.with_overrides(
            gpu_mem=gpu_mem,
            gpu_name=args.gpu_name,
            gpu_bw=parse_rate(args.gpu_bw) if args.gpu_bw else None,
            gpu_tflops=args.gpu_tflops,
            cpu_mem=cpu_mem,
            cpu_bw=parse_rate(args.cpu_bw) if args.cpu_bw else None,
            cpu_tflops=args.cpu_tflops,
            cpu_cores=args.cpu_cores,
            numa_nodes=args.numa_nodes,
            pcie_bw=parse_rate(args.pcie_bw) if args.pcie_bw else None,
        )
    except ValueError as e:
        raise HeteroError(str(e)) from None
    return prof, {"gpu_mem": gpu_mem, "cpu_mem": cpu_mem}


def _plan_cmd(args: argparse.Namespace) -> int:
    spec, name = load_spec(args.model)
    # A converted model or GGUF file holds its experts in one format already: plan with that one.
    experts, group_size = model_formats(args.model) or (args.experts, args.group_size)
    prof, budgets = profile_from_args(args, experts)
    plan = make_plan(
        spec,
        prof,
        name=name,
        **budgets,
        gpus=args.gpus,
        context=args.context,
        batch=args.batch,
        experts=experts,
        group_size=group_size,
        gpu_weights=args.gpu_weights,
        stored_fp8=stored_fp8(spec, args.gpus),
        kv_dtype=args.kv_dtype,
        freq=args.freq,
        prefill_tokens=args.prefill_tokens,
    )
    if args.output:
        Path(args.output).write_text(plan.to_json())
    print(plan.to_json(indent=1) if args.json else placement.format_plan(plan))
    return 0


def _profile_cmd(args: argparse.Namespace) -> int:
    prof, _ = profile_from_args(args)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=1))
        return 0
    g = prof.gpu
    rows = [
        ("CPU", f"{prof.cpu_model}, {prof.physical_cores} physical cores"),
        ("ISA", " ".join(prof.isa) or "(none of interest)"),
        (
            "NUMA",
            "; ".join(f"node {n.id}: {len(n.cpus)} CPUs, {fmt_bytes(n.mem_bytes)}" for n in prof.numa_nodes),
        ),
        ("RAM", f"{fmt_bytes(prof.ram_bytes)} total, {fmt_bytes(prof.ram_available)} available"),
        ("CPU read bandwidth", f"{prof.cpu_read_bw / 1e9:.1f} GB/s"),
        ("CPU fp32 FMA peak", f"{prof.cpu_flops / 1e12:.2f} TFLOP/s"),
        *(
            (
                f"CPU {fmt.replace('@', ' batch ')} expert kernels",
                f"{bw / 1e9:.1f} GB/s in decode ({bw / prof.cpu_read_bw:.0%} of read)",
            )
            for fmt, bw in sorted(prof.cpu_kernel_bw.items())
        ),
        ("GPU", f"{g.name}, {fmt_bytes(g.total_bytes)} ({fmt_bytes(g.free_bytes)} free)"),
        ("GPU memory bandwidth", f"{g.hbm_bw / 1e9:.0f} GB/s"),
        ("GPU bf16", f"{g.bf16_flops / 1e12:.0f} TFLOP/s"),
        ("host->GPU pinned", f"{prof.h2d_pinned_bw / 1e9:.1f} GB/s"),
        ("host->GPU pageable", f"{prof.h2d_pageable_bw / 1e9:.1f} GB/s"),
        ("measured", ", ".join(prof.measured) or "nothing (defaults and tables)"),
    ]
    if prof.overridden:
        rows.append(("overridden", ", ".join(prof.overridden)))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0
