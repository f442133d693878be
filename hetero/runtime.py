"""From a model name to a ready engine: checkpoint, tokenizer, weights, KV cache.

The CLI, the server and the benchmarks all start here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero.checkpoint import resolve_model_path
from hetero.config import ModelSpec
from hetero.distributed import SINGLE, Parallel, local_spec, rank0_first
from hetero.engine import Engine, EngineConfig
from hetero.errors import HeteroError
from hetero.graphs import LAUNCH_MODES
from hetero.kv_cache import KVCache, kv_bytes_per_token
from hetero.model import load_model
from hetero.planning import make_plan, model_formats, stored_fp8, with_kernel_rate
from hetero.prefix_cache import TierRates
from hetero.readahead import read_ahead
from hetero.tokenizer import Tokenizer

DEFAULT_PRESET = "deepseek-v3"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bulk(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on a thread that ends with it (``cpu_kernels.threads.on_own_thread``),
    with the caller's CUDA device and grad / inference modes: the load's and the probes' parallel
    regions leave no team of CPU threads behind besides the CPU worker's, whose decode calls would
    otherwise start each region by waking its threads one system call at a time."""
    from cpu_kernels.threads import on_own_thread

    device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run():
        if device is not None:
            torch.cuda.set_device(device)
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)

    return on_own_thread(run)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hetero"


def default_model_dir() -> Path:
    """The embedded default: a tiny DeepSeek-V3 with the real tokenizer, made on first use."""
    target = cache_dir() / "models" / f"{DEFAULT_PRESET}-tiny"
    if (target / "model.safetensors.index.json").is_file():
        return target
    from hetero.make_model import make_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".making-", dir=target.parent))
    try:
        make_model(DEFAULT_PRESET, tmp, tiny=True, seed=0, progress=False)
        # Rename last so an interrupted first run never leaves a half-written default behind.
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class RuntimeOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    max_model_len: int = 4096
    kv_tokens: int | None = None  # cache capacity; default: max_batch * max_model_len, capped
    max_batch: int = 16
    # Tokens a step computes (prompt chunks and decode rows together). None: with a plan, the prompt
    # length it sized its workspace and predicted prefill for (a step that streams RAM experts copies
    # all of them, however few tokens it carries, so smaller chunks would copy them again); else 512.
    max_step_tokens: int | None = None
    block_size: int = 16
    prefix_caching: bool = True  # reuse the KV blocks of prompt prefixes seen before
    host_kv_mem: int = 0  # bytes of host memory that keep prefix blocks evicted from the device; 0 = off
    # Offloading: plan the split between the device and RAM (default: when CUDA is present).
    offload: bool | None = None
    gpu_mem: int | None = None  # bytes of device memory to use; None = what is free
    cpu_mem: int | None = None
    experts: str = "int4"  # format of the routed experts: bf16 | int8 | int4
    group_size: int = 64
    gpu_weights: str = "auto"
    cuda_graphs: bool = True  # decode steps as CUDA graphs (CUDA only; --eager turns them off)
    decode_launch: str = "upfront"  # how the host drives those graphs: hetero.graphs.LAUNCH_MODES
    # Greedy decode steps launched one ahead, their CPU experts on the worker (EngineConfig.overlap)
    overlap: bool = True
    # Share of a decode step's RAM experts the GPU computes itself, reading them over PCIe while the CPU
    # computes the rest (hetero.experts.PCIeExperts, CUDA only); 0: off (the default: both read one
    # DRAM, see placement.cost); None: the share that balances the two rates
    pcie_share: float | None = 0.0
    # How often each layer's router picks each expert ({"layer": {"expert": count}}, or a JSON file of
    # it, as `hetero calibrate` writes): the plan puts each layer's most used experts on the GPU.
    # None: priced as uniform routing.
    expert_freq: str | dict | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose auto, {', '.join(_DTYPES)}")
        if self.host_kv_mem < 0 or (self.host_kv_mem and not self.prefix_caching):
            raise ValueError("host_kv_mem must be >= 0 and needs prefix_caching on")
        if self.pcie_share is not None and not 0 <= self.pcie_share < 1:
            raise ValueError(
                f"pcie_share {self.pcie_share}: choose a share in [0, 1), or None for the balanced one"
            )
        if self.decode_launch not in LAUNCH_MODES:
            raise ValueError(f"decode_launch {self.decode_launch!r}: choose one of {', '.join(LAUNCH_MODES)}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return _DTYPES[self.dtype]


@dataclass
class Runtime:
    path: Path
    spec: ModelSpec
    tokenizer: Tokenizer
    engine: Engine
    plan: object | None = None  # placement.Plan when offloading
    parallel: Parallel = SINGLE  # this rank's place when the GPU part is split over several GPUs


def _resolve(model: str | os.PathLike) -> Path:
    """A model directory, or a .gguf file (the first part of a split one)."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HeteroError(f"GGUF file {path} not found")
        return path
    return resolve_model_path(model)


DEFAULT_STEP_TOKENS = 512


def step_tokens(opts: RuntimeOptions, plan=None) -> int:
    """The engine's tokens a step: ``opts.max_step_tokens``, else the plan's prefill size (what its
    workspace holds and its prediction assumes), else DEFAULT_STEP_TOKENS; never under max_batch."""
    n = opts.max_step_tokens
    if n is None:
        predicted = getattr(plan, "predicted", None) or {}
        n = int(predicted.get("prefill_tokens") or DEFAULT_STEP_TOKENS)
    return max(n, opts.max_batch)


def load_runtime(
    model: str | os.PathLike | None = None,
    options: RuntimeOptions | None = None,
    parallel: Parallel = SINGLE,
) -> Runtime:
    """Load ``model`` (a directory or cached repo id; None = the embedded default) into an engine.

    With ``parallel`` over several ranks (see ``hetero.distributed``) this is one rank's engine,
    on cuda:rank; every rank must then run the same requests. ``gpu_mem`` is per GPU. CUDA
    graphs are off: the all-reduces would have to be captured between the graphs' CPU hand-offs.
    """
    opts = options or RuntimeOptions()
    path = default_model_dir() if model is None else _resolve(model)
    read_ahead(path)  # a no-op when the command line already started it
    gguf = path.suffix == ".gguf"
    if gguf:
        from hetero.gguf import GGUFSource

        source = GGUFSource(path)
        spec, tokenizer = source.spec(), source.tokenizer()
    else:
        spec = ModelSpec.from_pretrained(path)
        tokenizer = Tokenizer.from_pretrained(path)
    fixed = model_formats(str(path))  # a converted model or GGUF file already fixes the expert format
    experts, group_size = fixed or (opts.experts, opts.group_size)
    device = opts.torch_device()
    if device.type == "cuda":
        # Numba's threads on an OpenMP runtime of their own, not torch's (imported above), before any
        # kernel or probe starts them (cpu_kernels.threads). Not with the model on the CPU: there
        # torch's ops and the kernels take turns, and two runtimes would keep polling on each
        # other's cores.
        from cpu_kernels.threads import separate_openmp

        separate_openmp()
    split = parallel.world_size > 1
    if split and device.type == "cuda":
        device = torch.device("cuda", parallel.rank)
    dtype = opts.torch_dtype(device)
    max_len = min(opts.max_model_len, spec.max_position_embeddings)
    kv_tokens = opts.kv_tokens or min(opts.max_batch * max_len, 1 << 16)
    plan = None
    if opts.offload if opts.offload is not None else device.type == "cuda":
        import placement as hardware
        from hetero.apply import Placement, load_placed
        from placement.cost import stream_min_tokens

        # Measured once (with the CPU kernels' rate in this expert format), cached for the other ranks;
        # onto a GPU rank 0 measures the kernels' rate again at every load (a second or two): one
        # probe in a dip would otherwise price every later plan in that format. The other ranks take
        # what it cached, so that every rank makes the same plan.
        again = device.type == "cuda" and parallel.is_first
        profile = rank0_first(
            parallel, lambda: bulk(lambda: with_kernel_rate(hardware.detect(), experts, again))
        )
        plan = make_plan(
            spec,
            profile,
            name=path.name,
            gpu_mem=opts.gpu_mem,
            cpu_mem=opts.cpu_mem,
            context=max_len,
            batch=opts.max_batch,
            experts=experts,
            group_size=group_size,
            gpu_weights=opts.gpu_weights,
            stored_fp8=stored_fp8(spec, parallel.world_size, device),
            gpus=parallel.world_size,
            pcie_share=opts.pcie_share,
            freq=opts.expert_freq,
        )
        # Streaming means copying over PCIe; with no GPU the "device" already is the CPU.
        stream_from = stream_min_tokens(plan.cost_inputs) if device.type == "cuda" else None
        placement = Placement.from_plan(plan, stream_from)
        # The GPU reads RAM experts over PCIe itself: with CUDA only (the CPU device has no link).
        placement.pcie_share = plan.cost_inputs.pcie_share if device.type == "cuda" else 0.0
        net = bulk(
            load_placed,
            path,
            placement,
            device,
            dtype,
            progress=opts.progress and parallel.is_first,
            spec=spec,
            parallel=parallel,
        )
        kv_tokens = min(kv_tokens, plan.kv_tokens) if opts.kv_tokens is None else kv_tokens
    elif fixed is not None:
        # Packed or GGUF experts run on the CPU kernels as they are; there is no float copy to load.
        from hetero.apply import Placement, load_placed

        placement = Placement(expert_format=experts, group_size=group_size)
        net = bulk(
            load_placed, path, placement, device, dtype, progress=opts.progress, spec=spec, parallel=parallel
        )
    elif split:
        # Every expert on the devices, dealt out over the ranks; loaded through the host, split there.
        from hetero.apply import Placement, load_placed

        every = {i: list(range(spec.num_experts)) for i in spec.moe_layers}
        placement = Placement(every, expert_format="bf16")
        net = load_placed(path, placement, device, dtype, progress=False, spec=spec, parallel=parallel)
    else:
        net = load_model(str(path), dtype=dtype, device=device, spec=spec)
    kv = KVCache.for_tokens(local_spec(spec, parallel), kv_tokens, opts.block_size, dtype, device)
    host_blocks = opts.host_kv_mem // (kv_bytes_per_token(spec, dtype) * opts.block_size)
    if host_blocks:
        # With a plan, copy-back versus recompute is judged at its PCIe and prefill rates.
        kv.attach_host_tier(host_blocks, TierRates.from_plan(plan) if plan is not None else None)
    config = EngineConfig(
        max_batch=opts.max_batch,
        max_step_tokens=step_tokens(opts, plan),
        max_model_len=max_len,
        block_size=opts.block_size,
        prefix_caching=opts.prefix_caching,
        host_kv_blocks=host_blocks,
        overlap=opts.overlap,
    )
    engine = Engine(net, kv, config, eos_token_ids=tokenizer.eos_token_ids)
    if opts.cuda_graphs and device.type == "cuda" and not split:
        from hetero.graphs import DecodeGraphs

        max_blocks = -(-max_len // opts.block_size)
        engine.graphs = DecodeGraphs(
            net,
            kv.layers,
            max_blocks,
            max_batch=opts.max_batch,
            device=device,
            scratch_block=kv.scratch_block,
        )
        engine.graphs.launch = opts.decode_launch
    return Runtime(path, spec, tokenizer, engine, plan, parallel)
