"""`hetero bench`: measured prefill and decode speed next to the plan's prediction."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field

import torch

from hetero.distributed import SINGLE, Parallel, launch
from hetero.errors import HeteroError
from hetero.experts import HybridExperts, pin_streamed
from hetero.graphs import LAUNCH_MODES
from hetero.runtime import Runtime, RuntimeOptions, load_runtime
from hetero.sampling import SamplingParams
from placement.units import parse_size


@dataclass
class BenchResult:
    prompt_len: int
    gen: int
    batch: int
    prefill_s: float
    prefill_tok_s: float
    decode_s: float
    decode_tok_s: float
    predicted: dict = field(default_factory=dict)
    cpu_experts_s: float = 0.0  # CPU expert kernels during decode
    copies_s: float = 0.0  # waiting for device-to-host copies on the CPU side
    not_overlapped_s: float = 0.0  # time the device side waited on the CPU
    per_layer_cpu_ms: dict = field(default_factory=dict)
    speculation: dict | None = None  # acceptance rate and tokens per step when speculating
    prefill_ram_experts: dict = field(
        default_factory=dict
    )  # layer forwards of the timed prefill: cpu / stream
    cuda_graphs: list[int] = field(default_factory=list)  # batch sizes decoded through CUDA graphs
    decode_launch: str | None = None  # how the host drove them (hetero.graphs.LAUNCH_MODES)
    overlap: bool = False  # greedy steps launched one ahead (EngineConfig.overlap)
    eager_reasons: dict = field(default_factory=dict)  # batch size -> why its capture failed
    gpu_peak_bytes: int = 0  # most device memory torch held so far in this process
    plan_gpu_bytes: int = 0  # what the plan budgeted for the device


def ram_expert_bytes_per_token(
    model: torch.nn.Module, top_k: int, ram_shares: dict[int, float] | None = None
) -> float:
    """Bytes of RAM-resident expert weights one decoded token reads: with each layer's share of choices
    that land in RAM (``hetero.calibrate.ram_shares``; by default under uniform routing, the share of
    its experts in RAM). The decode roofline is the measured CPU read bandwidth over this."""
    from hetero.calibrate import ram_shares as uniform_shares

    shares = uniform_shares(model) if ram_shares is None else ram_shares
    total = 0.0
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, HybridExperts) and experts.cpu is not None:
            total += top_k * shares.get(i, 0.0) * experts.cpu.packed.expert_nbytes()
    return total


def _sync(rt: Runtime) -> None:
    if rt.engine.device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(rt: Runtime, prompt_len: int, gen: int, batch: int, seed: int = 0, trace: str | None = None):
    """Prefill ``batch`` random prompts of ``prompt_len`` tokens, then decode ``gen`` tokens each."""
    g = torch.Generator().manual_seed(seed)
    vocab = min(rt.spec.vocab_size, rt.tokenizer.vocab_size)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    engine = rt.engine
    worker = getattr(engine.model, "worker", None)
    # Warm up kernels and JIT compilation outside the timed region.
    # Its prompt shares no prefix with the timed ones: the prefix cache must not shorten their prefill.
    warm_len = min(32, prompt_len)  # within the context the engine was sized for
    warm = torch.randint(0, vocab, (warm_len,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    engine.generate([warm], SamplingParams(max_tokens=min(4, gen), temperature=0, ignore_eos=True))
    engine.warm_up([batch])  # the timed decode must not include capturing its CUDA graphs
    pin_streamed(engine.model)  # nor the timed prefill page-locking the streamed experts
    if engine.graphs is not None and engine.speculate is not None:
        engine.graphs.prepare(batch * (1 + engine.speculate.max_draft))  # nor those of verify steps
    params = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    hybrid = [m for m in engine.model.modules() if isinstance(getattr(m, "experts", None), HybridExperts)]
    for m in hybrid:
        m.experts.ram_calls = dict.fromkeys(m.experts.ram_calls, 0)
    _sync(rt)
    t0 = time.perf_counter()
    while not all(s.output_ids for s in seqs):
        engine.step()
    _sync(rt)
    t1 = time.perf_counter()
    ram_paths = {k: sum(m.experts.ram_calls[k] for m in hybrid) for k in ("cpu", "stream", "pcie")}
    if worker is not None:
        worker.timings.reset()
    steps = 0
    prof = None
    if trace:
        prof = torch.profiler.profile(record_shapes=False)
        prof.__enter__()
    while engine.scheduler.has_work:
        engine.step()
        steps += 1
    _sync(rt)
    t2 = time.perf_counter()
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(trace)
    decoded = sum(len(s.output_ids) - 1 for s in seqs)
    res = BenchResult(
        prompt_len=prompt_len,
        gen=gen,
        batch=batch,
        prefill_s=t1 - t0,
        prefill_tok_s=prompt_len * batch / (t1 - t0),
        decode_s=t2 - t1,
        decode_tok_s=decoded / max(t2 - t1, 1e-9),
        predicted=dict(getattr(rt.plan, "predicted", {}) or {}),
        speculation=engine.spec_stats,
        prefill_ram_experts=ram_paths,
    )
    if engine.device.type == "cuda":
        res.gpu_peak_bytes = torch.cuda.max_memory_reserved(engine.device)
        res.plan_gpu_bytes = getattr(rt.plan, "gpu_bytes", 0)
    if engine.graphs is not None:
        res.cuda_graphs = sorted(engine.graphs.entries)
        res.decode_launch = engine.graphs.launch
        res.overlap = engine.config.overlap
        res.eager_reasons = dict(engine.graphs.failed)
    if worker is not None:
        tm = worker.timings
        res.cpu_experts_s, res.copies_s, res.not_overlapped_s = tm.cpu_experts, tm.copies, tm.wait
        res.per_layer_cpu_ms = {k: 1000 * v / max(steps, 1) for k, v in sorted(tm.per_layer.items())}
    return res


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prefill and decode speed against the plan's prediction")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument("--gpu-mem", default=None, help="device memory to use, e.g. 6GiB (enforced in-process)")
    p.add_argument("--cpu-mem", default=None)
    p.add_argument("--experts", choices=["bf16", "int8", "int4"], default="int4")
    p.add_argument("--gpu-weights", default="auto")
    p.add_argument(
        "--freq", default=None, help="expert-activation counts (`hetero calibrate`): the most used on the GPU"
    )
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--defer-experts",
        type=int,
        default=0,
        help="finish each token's N lightest RAM experts during the next layer (changes the numbers; "
        "launches upfront unless --decode-launch says otherwise)",
    )
    p.add_argument("--speculate", default=None, metavar="ngram|draft:DIR|mtp", help="speculative decoding")
    p.add_argument("--spec-k", default="4", help="drafted tokens per step: N or auto")
    p.add_argument("--eager", action="store_true", help="launch decode kernels one by one (no CUDA graphs)")
    p.add_argument(
        "--decode-launch",
        choices=LAUNCH_MODES,
        default=None,
        help="how the host drives the decode graphs: the CPU experts between launches (in_turn), one "
        "hand-off behind them (pipelined), on a worker thread with the whole step launched "
        "(ahead), after the whole step is launched as one graph (upfront, the default), or as "
        "upfront in graphs of 16 CPU layers, two at most launched ahead of the CPU work (chunks)",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="run each greedy decode step to its tokens before launching the next (default: the "
        "next one launched before the tokens are read, its CPU experts on the worker thread)",
    )
    p.add_argument(
        "--pcie-share",
        default="0",
        help="share of each decode step's RAM experts the GPU computes, reading them over PCIe: "
        "a number in [0, 1) (default 0: the CPU computes all) or 'auto' (balanced by the rates)",
    )
    p.add_argument("--trace", default=None, help="write a Chrome trace of the decode phase to this file")
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="split the GPU part over N GPUs (one process each; --gpu-mem is per GPU)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.gpus < 1:
        raise HeteroError(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpus == 1:
        return _bench(SINGLE, args)
    backend = "gloo" if args.device == "cpu" else None
    return launch(_bench, args.gpus, args, backend=backend)[0]  # rank 0 printed; all ran the same steps


def _share_arg(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0 <= share < 1:
        raise HeteroError(f"--pcie-share must be a number in [0, 1) or auto, got {text!r}")
    return share


def _bench(par: Parallel, args: argparse.Namespace) -> int:
    opts = capped_options(
        args.gpu_mem,
        par.rank,
        offload=True,
        device=args.device,
        cpu_mem=parse_size(args.cpu_mem) if args.cpu_mem else None,
        experts=args.experts,
        gpu_weights=args.gpu_weights,
        max_batch=args.batch,
        max_model_len=args.prompt_len + args.gen + 8,
        max_step_tokens=max(512, args.prompt_len),
        cuda_graphs=not args.eager,
        # upfront also suits deferred experts best: on the H100 machine (V2-Lite int4, 2 deferred) 10.58 ms
        # a step against 10.89 ahead, 11.63 pipelined, 13.32 in turn (decode_launch_defer-...-int4.json)
        decode_launch=args.decode_launch or RuntimeOptions.decode_launch,
        overlap=not args.no_overlap,
        pcie_share=_share_arg(args.pcie_share),
        expert_freq=args.freq,
    )
    rt = load_runtime(args.model, opts, par)
    if args.defer_experts:
        from hetero.moe import defer_experts

        defer_experts(rt.engine.model, args.defer_experts)
    if args.speculate:
        from hetero.speculative import enable_speculation

        enable_speculation(rt, args.speculate, args.spec_k)
    res = run_bench(rt, args.prompt_len, args.gen, args.batch, trace=args.trace)
    if not par.is_first:
        return 0
    if args.json:
        print(json.dumps(asdict(res)))
        return 0
    pred = res.predicted
    print(
        f"prefill: {res.prefill_tok_s:10.1f} tok/s   predicted {pred.get('prefill_tok_s', float('nan')):10.1f}"
    )
    if any(res.prefill_ram_experts.values()):
        print(f"prefill RAM experts, layer forwards: {res.prefill_ram_experts}")
    print(
        f"decode:  {res.decode_tok_s:10.2f} tok/s   predicted {pred.get('decode_tok_s', float('nan')):10.2f}"
    )
    print(
        f"decode time {res.decode_s:.2f}s: CPU experts {res.cpu_experts_s:.2f}s, copies {res.copies_s:.2f}s, "
        f"device waited on CPU {res.not_overlapped_s:.2f}s"
    )
    if res.speculation:
        print(f"speculation: {res.speculation}")
    if res.cuda_graphs:
        how = (
            "steps launched one ahead, CPU experts on the worker"
            if res.overlap
            else f"launched {res.decode_launch}"
        )
        print(f"decode ran as CUDA graphs (batch sizes {res.cuda_graphs}), {how}")
    if res.plan_gpu_bytes:
        print(
            f"device memory: peak {res.gpu_peak_bytes / 2**30:.2f} GiB held by torch, "
            f"the plan's {res.plan_gpu_bytes / 2**30:.2f} GiB"
        )
    if res.eager_reasons:
        print(f"decode ran eagerly for batch sizes {res.eager_reasons}")
    for layer, ms in res.per_layer_cpu_ms.items():
        print(f"  layer {layer:3d}: CPU experts {ms:7.3f} ms/step")
    return 0


def capped_options(gpu_mem: str | None, cuda_index: int = 0, **options) -> RuntimeOptions:
    """Runtime options under a device cap such as "6GiB" (None: no cap), the cap enforced in this
    process on CUDA device ``cuda_index``."""
    nbytes = parse_size(gpu_mem) if gpu_mem else None
    cap_device_memory(nbytes, cuda_index)
    return RuntimeOptions(gpu_mem=nbytes, **options)


def cap_device_memory(nbytes: int | None, device: int = 0) -> None:
    """Hold this process to ``nbytes`` of memory on CUDA device ``device``, as a smaller card would."""
    if nbytes and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, nbytes / total), device)
