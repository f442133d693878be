"""Roofline cost model of one decode step and one prefill.

Every module's time on a device is max(bytes read / bandwidth, FLOPs / compute rate), with
rates from the hardware profile scaled by the fraction of peak real kernels reach. Within a
layer the GPU first runs attention and the router; then the CPU's routed experts and the GPU's
shared / resident experts run side by side, so the layer costs the slower of the two branches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any

# Fractions of peak that kernels reach. GPU: decode GEMVs read ~80% of HBM peak and prefill GEMMs
# reach ~60% of dense tensor FLOP/s. CPU: the probe already measures achievable read bandwidth; the
# expert kernels dequantize while they read and reach ~70% of it (the reference machine's naive
# int8 GEMV: 55 of 93 GB/s); for compute, JIT-compiled kernels without AMX reach ~30% of FMA peak.
GPU_BW_EFF = 0.8
GPU_FLOP_EFF = 0.6
CPU_BW_EFF = 0.7
CPU_FLOP_EFF = 0.3
# Prefill on the GPU reaches far less than GEMM peak: per layer a prompt runs attention, the shared
# and resident experts, and (streaming) unpacks the RAM experts to bf16 (``_unpack_bytes``) before
# their math. A layer that streams overlaps that GPU work with the PCIe copies of its next chunks:
# a 2048-token prefill of the V2-Lite shape on an H100 took 5.0 ms a layer in int4 (4.7 ms of PCIe)
# and 10.2 ms in int8 (9.4 ms), so a streamed layer costs the larger of the two, plus attention.
# Verify steps of 80 and 144 rows that streamed took 5.7 ms a layer
# (benchmarks/results/e2e-deepseek-v2-lite-fp8-h100-6GiB.json, speculative-*.json).
PREFILL_GPU_FLOP_EFF = 0.23
# A speculative verify's k + 1 consecutive tokens of one sequence touch fewer distinct experts
# than k + 1 independent tokens: on the V2-Lite shape (H100 + Xeon, batch 1) 2, 3, 5 and 9 of them
# read 8.7, 11.8, 16.8 and 23.7 of 52 RAM experts, as many as 1.8, 2.6, 3.9 and 6.1 independent
# tokens would: about n ** 0.85 (benchmarks/results/speculative-*.json, unique_cpu_experts).
SEQ_ROUTING_EXPONENT = 0.85
# A decode step wide enough to stream runs without CUDA graphs: its launches and the chunks'
# bookkeeping cost ~1 ms a layer beyond the PCIe time (the verify steps above).
STREAMED_STEP_LAYER_S = 1.0e-3
# Per layer and step: kernel launches and Python dispatch on the GPU side (see HANDOFF_S for how
# the two are measured together now).
LAYER_OVERHEAD_S = 20e-6
# Per layer that sends work to the CPU: ending a CUDA graph, the device-to-host copy and the event
# wait for it, the copy back and the next graph's work up to the next router, unpriced small
# kernels mostly. Measured: int4 decode on an H100 with a 16-core Xeon (V2-Lite shape, CUDA graphs)
# took 13.6 ms a step, 8.7 ms of it in the CPU kernels; of the other 4.9 ms, 1.35 ms is priced GPU
# work and overhead, and ~140 us for each of the 26 hand-offs was this
# (benchmarks/results/e2e-deepseek-v2-lite-fp8-h100-6GiB.json). The fused block kernels since
# (gpu_kernels/norm.py, rope.py, router.py, handoff.py) cut the CPU side's wait for the GPU from 73 to
# 29 us a layer (int4; e2e-...-fused.json), so ~95 us. Against three later runs (e2e-...-h200-6GiB-int4,
# -int8, e2e-...-h100-6GiB-int4-defer2) 140 us had priced decode 12%, 20% and 6% under the measurement;
# 95 us, on the same inputs, 3% and 15% under and 2% over. CPU calls made ahead of their inputs
# (hetero.graphs.early_calls) took another ~17 us off each (10.15 against 10.61 ms a step of 27
# hand-offs, decode_early-...-h100-6GiB-int4.json), so ~78 us; the end-to-end run after them
# (e2e-...-h100-6GiB-early-hostparts.json) had been priced 9% under its int4 decode at 95 us.
# The router in one load, fused input projections and the staging mapping ids took a V2-Lite layer's
# GPU segment from 88.5 to 72.0 us (decode_profile-...-int4-segment-fused.json), and launching the
# step upfront (the default since) cut the host's time outside the CPU calls from 1.5 to 0.9 ms a
# step (decode_launch-...-h100-6GiB-int4-fused.json): at 78 us the plans of the next run
# (e2e-...-h100-6GiB-upfront.json, e2e-qwen3-...-h100-10GiB.json) had measured decode (first and
# repeated runs) at 1.25-1.14 / 1.01-1.00 of them (V2-Lite int4 / int8) and 1.19-1.14 / 1.01-1.08
# (Qwen3-30B-A3B); 23 us less a hand-off makes those 1.19-1.08, 0.97-0.96, 1.10-1.05 and 0.96-1.03.
# Plain hand-offs called as prepared calls (cpu_kernels.DecodeCall) took the gap between a layer's
# CPU output and the next layer's inputs from 59 to 43 us (decode_prepared-qwen3-...-int4.json); at
# 55 us the plans of the run after it (e2e-*-h200-*-prepared.json) had measured decode at 1.22 / 1.04
# of them (Qwen3-30B-A3B int4 / int8) and 1.10 / 1.00 (V2-Lite); 17 us less a hand-off makes those
# 1.13 / 0.99 and 1.05 / 0.97. The CPU worker's kernel threads as the process's only OpenMP team
# (cpu_kernels.threads) took that gap from 46 to 41 us in an alternating comparison
# (decode_teams-qwen3-...-int4.json; its end-to-end run had a start probe too low to price by), so 33 us.
# Together with LAYER_OVERHEAD_S (30 us then) and the layer's priced GPU reads (~9 us), a CPU layer's
# fixed cost came to ~72 us, where the CPU kernels' traces on the H200 machine put the whole GPU
# segment between two layers' CPU calls at 39 us (Qwen3-30B-A3B) and 50 us (V2-Lite), plus ~4 us
# of input quantization and ~2 us of the region's join in the call
# (decode_threads-*-h200-*-int4-one-team.json): the end-to-end runs with both probe fixes measured
# int4 decode at 1.21 and 1.18 of their plans, int8 at 1.05 and 1.01 (V2-Lite, Qwen3-30B-A3B;
# e2e-*-h200-*-clean.json). At 20 + 25 us the same plans give 1.15 / 1.09 (int4) and 1.02 / 0.96
# (int8), and the two earlier V2-Lite int4 runs 0.99 and 0.96 instead of 1.04 and 1.02
# (e2e-deepseek-v2-lite-...-int4-first.json, -second.json). The next V2-Lite int4 run, priced so,
# came to 1.21 (1.28 at the old costs; e2e-...-int4-fixedcost.json): there the int4 kernel-rate
# probe, not these, was what priced it low (its whole step took less than the plan's CPU part).
HANDOFF_S = 25e-6

# Decode steps may split their RAM experts between the CPU kernels and the GPU reading the packed
# bytes over PCIe itself (hetero.experts.PCIeExperts; off unless asked for). Such a kernel read
# host memory at 46-51 GB/s over the reference machine's PCIe Gen5 x16 (54.5 GB/s pinned copies).
# Both sides read the same DRAM, so a split step is priced no faster than all its RAM bytes at the
# measured read bandwidth (``CostInputs.ram_bw``). On that machine (H100 + 16-core Xeon, V2-Lite int4,
# benchmarks/results/decode_pcie_share-*.json) the CPU kernels already read close to it and slowed
# down more than their share shrank: decode went from 66 tok/s unsplit to 59-68 split.
ZERO_COPY_EFF = 0.85
PCIE_SPLIT_FORMATS = ("int4", "int8")
# Decode steps of up to this many token-expert choices split (gpu_kernels.moe_gemv.GEMV_MAX_SLOTS: the
# fused MoE's GEMV sizes); the runtime (hetero.experts) uses this same number
PCIE_MAX_PAIRS = 64
# Experts of one layer and step the GPU takes at most; their packed bytes are gathered into a device
# buffer of this many slots (hetero.experts.PCIeExperts), which the plan's workspace holds
PCIE_MAX_EXPERTS = 8

# Several GPUs: two all-reduces of the hidden states per layer (attention, then MLP / MoE), each
# priced as its bf16 bytes over an assumed GPU-to-GPU bandwidth plus a fixed launch latency.
LINK_BW = 100e9
ALL_REDUCE_S = 10e-6

RESOURCES = ("gpu-memory", "gpu-compute", "cpu-memory", "cpu-compute", "pcie", "link", "overhead")


@dataclass(frozen=True)
class Rates:
    """Effective rates, already scaled by the efficiency factors (bytes/s, FLOP/s)."""

    gpu_bw: float
    gpu_flops: float
    cpu_bw: float
    cpu_flops: float
    pcie_bw: float

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"rate {f.name} must be positive")

    @classmethod
    def from_profile(
        cls,
        profile: Any,
        gpus: int = 1,
        expert_format: str | None = None,
        batch: int = 1,
        top_k: int = 0,
        num_experts: int = 0,
    ) -> Rates:
        """With ``gpus`` > 1 the GPU rates add up: the GPU part is split evenly over them (the
        replicated router, norms and output head are priced as if split too; they are small).
        The CPU's bandwidth is what the expert kernels were measured to stream in
        ``expert_format`` at decode batch ``batch`` of a model routing top-``top_k`` of
        ``num_experts`` (``kernel_bw``) when the profile has it, else a fixed share of the read
        bandwidth."""
        g = profile.gpu
        measured = kernel_bw(getattr(profile, "cpu_kernel_bw", {}), expert_format, batch, top_k, num_experts)
        return cls(
            gpu_bw=g.hbm_bw * GPU_BW_EFF * gpus,
            gpu_flops=g.bf16_flops * GPU_FLOP_EFF * gpus,
            cpu_bw=measured or profile.cpu_read_bw * CPU_BW_EFF,
            cpu_flops=profile.cpu_flops * CPU_FLOP_EFF,
            pcie_bw=profile.h2d_pinned_bw,
        )


# Decode batch sizes at which the runtime measures the CPU expert kernels: "int4" is one token,
# "int4@16" sixteen (more tokens per expert shift the kernels from streaming toward compute), on
# a layer of PROBE_EXPERTS experts of V2-Lite's size, each token routed to PROBE_TOP_K of them.
KERNEL_PROBE_BATCHES = (1, 16)
PROBE_EXPERTS, PROBE_TOP_K = 32, 6


def kernel_key(fmt: str, batch: int) -> str:
    """The name a kernel rate is recorded under in a profile's ``cpu_kernel_bw``."""
    return fmt if batch == 1 else f"{fmt}@{batch}"


def tokens_per_expert(tokens: float, top_k: int, num_experts: int) -> float:
    """Tokens each touched expert computes on average when ``tokens`` tokens each pick ``top_k``
    of ``num_experts`` uniformly: what moves a step's expert kernels from streaming to compute."""
    return tokens * top_k / expected_unique_experts(tokens, top_k, num_experts)


def kernel_bw(
    measured: dict[str, float], fmt: str | None, batch: int, top_k: int = 0, num_experts: int = 0
) -> float | None:
    """The kernels' measured decode bandwidth in ``fmt`` at ``batch`` tokens of a model routing
    top-``top_k`` of ``num_experts`` (default: the probe's own layer): between the probed rates,
    interpolated in log(tokens per touched expert), which is what the probe at 16 tokens varies
    (3.1 on its 32-expert layer; V2-Lite's 64 experts see 1.9 at batch 16, DeepSeek-V3's 256 see
    1.3); beyond them, the nearest. None if not measured."""
    lo, hi = (measured.get(kernel_key(f"{fmt}", b)) for b in KERNEL_PROBE_BATCHES)
    if lo is None or hi is None or batch <= 1:
        return lo
    if not 0 < top_k <= num_experts:
        top_k, num_experts = PROBE_TOP_K, PROBE_EXPERTS
    probed = tokens_per_expert(KERNEL_PROBE_BATCHES[1], PROBE_TOP_K, PROBE_EXPERTS)
    t = min(1.0, math.log(tokens_per_expert(batch, top_k, num_experts)) / math.log(probed))
    return lo + t * (hi - lo)


@dataclass(frozen=True)
class LayerCost:
    """One layer. Bytes are read once per step; FLOPs are per token."""

    pre_bytes: float  # attention, norms, router
    pre_flops: float
    mlp_bytes: float  # shared experts or the dense MLP (GPU)
    mlp_flops: float
    expert_bytes: float  # one routed expert in the expert format
    expert_flops: float  # per token routed to it
    gpu_probs: tuple[float, ...]  # per-token hit probability of each GPU-resident routed expert
    cpu_probs: tuple[float, ...]
    kv_bytes_per_pos: float
    attn_flops_decode: float  # per token per cached position
    attn_flops_prefill: float


@dataclass(frozen=True)
class CostInputs:
    layers: tuple[LayerCost, ...]
    head_bytes: float  # final norm + lm_head
    head_flops: float
    hidden_size: int
    rates: Rates
    context: int  # cached tokens per sequence at which a decode step is priced
    batch: int
    gpus: int = 1  # GPUs the GPU part is split over; more than one adds the all-reduces
    link_bw: float = LINK_BW  # bytes/s between GPUs, for the all-reduces
    # Share of a decode step's RAM expert reads the GPU takes over PCIe (``pcie_share``); 0: none
    pcie_share: float = 0.0
    top_k: int = 0  # experts per token (0: unknown; then no step splits)
    ram_bw: float = 0.0  # bytes/s the CPU can read from RAM, which a split step shares (0: unknown)

    def link_time(self, tokens: int) -> float:
        """One layer's two all-reduces of ``tokens`` hidden states (bf16); 0 on one GPU."""
        if self.gpus == 1:
            return 0.0
        return 2 * (ALL_REDUCE_S + self.hidden_size * tokens * 2 / self.link_bw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for layer in d["layers"]:
            layer["gpu_probs"] = [round(p, 6) for p in layer["gpu_probs"]]
            layer["cpu_probs"] = [round(p, 6) for p in layer["cpu_probs"]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostInputs:
        layers = tuple(
            LayerCost(**{**x, "gpu_probs": tuple(x["gpu_probs"]), "cpu_probs": tuple(x["cpu_probs"])})
            for x in d["layers"]
        )
        return cls(**{**d, "layers": layers, "rates": Rates(**d["rates"])})


@dataclass
class StepTime:
    seconds: float
    tokens: int
    by_resource: dict[str, float] = field(default_factory=dict)
    layers: list[float] = field(default_factory=list)
    expert_mode: list[str] = field(default_factory=list)  # prefill: "cpu" or "stream" per MoE layer

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def bound(self) -> str:
        return max(self.by_resource, key=self.by_resource.get) if self.by_resource else "overhead"


# --------------------------------------------------------------------------- expert hits


def expected_unique_experts(
    n_tokens: float,
    top_k: int = 0,
    num_experts: int = 0,
    probs: list[float] | tuple[float, ...] | None = None,
) -> float:
    """Experts touched by ``n_tokens`` tokens routed top-k of E.

    Uniform routing: E * (1 - (1 - k/E)^n). With ``probs`` (each expert's per-token hit
    probability, summing to k): sum of 1 - (1 - p)^n.
    """
    if probs is not None:
        return sum(touch_probability(p, n_tokens) for p in probs)
    if num_experts <= 0 or not 0 < top_k <= num_experts:
        raise ValueError(f"need 0 < top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    return num_experts * touch_probability(top_k / num_experts, n_tokens)


def touch_probability(p: float, n_tokens: float) -> float:
    """Chance that at least one of n tokens picks an expert each picks with probability p."""
    return 1.0 - (1.0 - min(max(p, 0.0), 1.0)) ** n_tokens


@dataclass
class Branch:
    """Running sums over a set of experts, so the planner can move one at a time in O(1)."""

    n: float
    touched: float = 0.0  # expected experts read per step
    load: float = 0.0  # expected experts per token
    log_none: float = 0.0  # log P(no expert of the set is touched)

    def add(self, p: float, sign: int = 1) -> None:
        self.touched += sign * touch_probability(p, self.n)
        self.load += sign * p
        self.log_none += sign * self.n * math.log1p(-min(p, 1 - 1e-12))

    @classmethod
    def of(cls, probs: tuple[float, ...], n: float) -> Branch:
        b = cls(n)
        for p in probs:
            b.add(p)
        return b


def _roof(nbytes: float, flops: float, bw: float, rate: float, dev: str) -> tuple[float, str]:
    tm, tc = nbytes / bw, flops / rate
    return (tm, f"{dev}-memory") if tm >= tc else (tc, f"{dev}-compute")


def _unpack_bytes(lc: LayerCost, experts: float) -> float:
    """GPU memory traffic of unpacking ``experts`` streamed experts to bf16 before their math: the
    packed bytes read, then the bf16 weights written and read back (2 bytes a weight each way;
    ``expert_flops`` counts 2 a weight)."""
    return experts * (lc.expert_bytes + 2 * lc.expert_flops)


def _streamed(lc: LayerCost, gpu: Branch, cpu: Branch, n: int, r: Rates) -> tuple[float, float, str]:
    """A layer whose RAM experts cross PCIe to run on the GPU with the resident ones, for ``n``
    tokens: (PCIe seconds, GPU seconds, the GPU's bound). Each chunk is unpacked, then computed;
    the layer overlaps both with the copies (``_overlap``)."""
    t_gs, res_gs = _roof(
        lc.mlp_bytes + gpu.touched * lc.expert_bytes,
        n * (lc.mlp_flops + (gpu.load + cpu.load) * lc.expert_flops),
        r.gpu_bw,
        r.gpu_flops * PREFILL_GPU_FLOP_EFF / GPU_FLOP_EFF,
        "gpu",
    )
    t_gs += _unpack_bytes(lc, cpu.touched) / r.gpu_bw
    return cpu.touched * lc.expert_bytes / r.pcie_bw, t_gs, res_gs


def _overlap(parts: dict[str, float], t_pcie: float, t_gs: float, res_gs: str) -> None:
    """A streamed layer: its copies and its GPU work overlap; the larger one is what it costs."""
    if t_pcie >= t_gs:
        parts["pcie"] = parts.get("pcie", 0.0) + t_pcie
    else:
        parts[res_gs] = parts.get(res_gs, 0.0) + t_gs


# --------------------------------------------------------------------------- decode


def routed_tokens(batch: int, tokens_per_step: int = 1) -> float:
    """How many independently routed tokens a step's expert reads amount to: ``batch`` sequences
    of ``tokens_per_step`` consecutive tokens each (a speculative verify). A sequence's
    consecutive tokens often pick the same experts, so they count as tokens_per_step ** γ."""
    return batch * tokens_per_step**SEQ_ROUTING_EXPONENT


def pcie_splits(expert_format: str, gpus: int = 1, share: float | None = None) -> bool:
    """Whether decode steps give the GPU a share of their RAM experts: asked for (``share`` not 0;
    None: balanced), on one GPU, in a format the runtime splits."""
    return share != 0 and gpus == 1 and expert_format in PCIE_SPLIT_FORMATS


def pcie_share(r: Rates, expert_format: str, gpus: int = 1, share: float | None = None) -> float:
    """Share of a decode step's RAM expert bytes the GPU reads itself over PCIe: ``share`` as given,
    or (None) the one that has both sides finish together, PCIe rate over the sum of the two rates;
    0 where the runtime does not split (several GPUs, bf16 experts)."""
    if not pcie_splits(expert_format, gpus, share):
        return 0.0
    if share is not None:
        return share
    zc = r.pcie_bw * ZERO_COPY_EFF
    return zc / (zc + r.cpu_bw)


def decode_layer_time(
    lc: LayerCost,
    gpu: Branch,
    cpu: Branch,
    r: Rates,
    hidden: int,
    batch: int,
    context: int,
    stream: bool = False,
    n: int | None = None,
    share: float = 0.0,
    ram_bw: float = 0.0,
) -> tuple[float, dict[str, float]]:
    """Seconds of one layer for ``n`` tokens (default ``gpu.n``; the branches may be built over
    fewer, ``routed_tokens``), ``batch`` sequences at ``context`` cached tokens; ``stream``: the
    RAM experts cross PCIe to run on the GPU (a step of many rows) instead of on the CPU;
    ``share``: of the RAM experts' bytes, what the GPU reads over PCIe itself (not streaming), the
    two sides together no faster than ``ram_bw`` (when known)."""
    n = gpu.n if n is None else n
    kv = lc.kv_bytes_per_pos * context * batch
    t_pre, res_pre = _roof(
        lc.pre_bytes + kv, n * (lc.pre_flops + lc.attn_flops_decode * context), r.gpu_bw, r.gpu_flops, "gpu"
    )
    t_g, res_g = _roof(
        lc.mlp_bytes + gpu.touched * lc.expert_bytes,
        n * (lc.mlp_flops + gpu.load * lc.expert_flops),
        r.gpu_bw,
        r.gpu_flops,
        "gpu",
    )
    share = 0.0 if stream else share
    t_c, res_c = _roof(
        (1 - share) * cpu.touched * lc.expert_bytes,
        (1 - share) * n * cpu.load * lc.expert_flops,
        r.cpu_bw,
        r.cpu_flops,
        "cpu",
    )
    # the GPU's share, read over PCIe after the resident experts, while the CPU computes the rest
    t_z = share * cpu.touched * lc.expert_bytes / (r.pcie_bw * ZERO_COPY_EFF)
    if share > 0 and ram_bw > 0:  # one DRAM serves both
        t_c = max(t_c, cpu.touched * lc.expert_bytes / ram_bw)
    p_any = 1.0 - math.exp(cpu.log_none)
    hand = p_any * (HANDOFF_S + 2 * n * hidden * 2 / r.pcie_bw)  # activations there and back, bf16
    parts = {res_pre: t_pre, "overhead": LAYER_OVERHEAD_S}
    if stream and lc.cpu_probs:  # priced as a streamed prefill layer, run eagerly
        _overlap(parts, *_streamed(lc, gpu, cpu, n, r))
        parts["overhead"] += STREAMED_STEP_LAYER_S
    elif t_c + hand > t_g + t_z:
        parts[res_c] = parts.get(res_c, 0.0) + t_c
        parts["pcie"] = hand
    elif t_z > t_g:
        parts["pcie"] = parts.get("pcie", 0.0) + t_z + t_g
    else:
        parts[res_g] = parts.get(res_g, 0.0) + t_g + t_z
    return sum(parts.values()), parts


AUTO = "auto"


def decode_step_time(
    inputs: Any,
    tokens_per_step: int = 1,
    batch: int | None = None,
    context: int | None = None,
    stream_from: int | None | str = AUTO,
) -> StepTime:
    """One decode step: ``batch`` sequences each adding ``tokens_per_step`` tokens (a speculative
    verify of k drafted tokens is tokens_per_step = k + 1). ``inputs``: CostInputs or a Plan.
    ``stream_from``: rows from which the step streams its RAM experts to the GPU (None: never;
    AUTO: from ``stream_min_tokens``, as the runtime does on a GPU)."""
    ci: CostInputs = getattr(inputs, "cost_inputs", inputs)
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be at least 1, got {tokens_per_step}")
    batch = batch or ci.batch
    context = ci.context if context is None else context
    n = batch * tokens_per_step
    r = ci.rates
    if stream_from == AUTO:
        stream_from = stream_min_tokens(ci)
    stream = stream_from is not None and n >= stream_from
    routed = routed_tokens(batch, tokens_per_step)
    share = ci.pcie_share if 0 < n * ci.top_k <= PCIE_MAX_PAIRS else 0.0
    out = StepTime(0.0, n, dict.fromkeys(RESOURCES, 0.0))
    for lc in ci.layers:
        t, parts = decode_layer_time(
            lc, Branch.of(lc.gpu_probs, routed), Branch.of(lc.cpu_probs, routed), r, ci.hidden_size,
            batch, context, stream, n, share, ci.ram_bw,
        )  # fmt: skip
        if ci.gpus > 1:
            parts["link"] = ci.link_time(n)
            t += parts["link"]
        out.layers.append(t)
        for k, v in parts.items():
            out.by_resource[k] += v
    t_head, res = _roof(ci.head_bytes, n * ci.head_flops, r.gpu_bw, r.gpu_flops, "gpu")
    out.by_resource[res] += t_head
    out.seconds = sum(out.layers) + t_head
    return out


# --------------------------------------------------------------------------- prefill

STREAM_PROBE_TOKENS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@functools.lru_cache(maxsize=64)
def stream_min_tokens(ci: CostInputs) -> int | None:
    """Smallest step of tokens (of ``STREAM_PROBE_TOKENS``) that is cheaper streaming its RAM
    experts over PCIe than running them on the CPU; None: never. The runtime streams prefill
    chunks and decode steps from this many tokens on. Priced as a decode step of that many rows,
    the narrowest step that streams (prefill chunks are wider, and favour streaming more)."""
    for tokens in STREAM_PROBE_TOKENS:
        streamed = decode_step_time(ci, 1, batch=tokens, stream_from=tokens).seconds
        if streamed < decode_step_time(ci, 1, batch=tokens, stream_from=None).seconds:
            return tokens
    return None


def prefill_time(inputs: Any, tokens: int) -> StepTime:
    """A prompt of ``tokens`` tokens, layer by layer. Per layer the CPU-resident experts either run
    on the CPU or have their weights streamed over PCIe to run on the GPU, whichever is faster."""
    ci: CostInputs = getattr(inputs, "cost_inputs", inputs)
    if tokens < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    r, T = ci.rates, tokens
    flops = r.gpu_flops * PREFILL_GPU_FLOP_EFF / GPU_FLOP_EFF
    out = StepTime(0.0, T, dict.fromkeys(RESOURCES, 0.0))
    for lc in ci.layers:
        attn = T * lc.pre_flops + lc.attn_flops_prefill * T * T / 2  # causal: half the score matrix
        t_pre, res_pre = _roof(lc.pre_bytes + lc.kv_bytes_per_pos * T, attn, r.gpu_bw, flops, "gpu")
        gpu, cpu = Branch.of(lc.gpu_probs, T), Branch.of(lc.cpu_probs, T)
        gb, gf = lc.mlp_bytes + gpu.touched * lc.expert_bytes, T * (lc.mlp_flops + gpu.load * lc.expert_flops)
        cb, cf = cpu.touched * lc.expert_bytes, T * cpu.load * lc.expert_flops
        t_g, res_g = _roof(gb, gf, r.gpu_bw, flops, "gpu")
        t_c, res_c = _roof(cb, cf, r.cpu_bw, r.cpu_flops, "cpu")
        t_c += 2 * T * ci.hidden_size * 2 / r.pcie_bw if cb else 0.0
        # Streaming: the GPU also runs the CPU's experts, chunk by chunk as their weights cross PCIe.
        t_pcie, t_gs, res_gs = _streamed(lc, gpu, cpu, T, r)
        parts = {res_pre: t_pre, "overhead": LAYER_OVERHEAD_S}
        if not lc.cpu_probs or max(t_g, t_c) <= max(t_gs, t_pcie):
            slow, res = (t_c, res_c) if t_c > t_g else (t_g, res_g)
            out.expert_mode.append("cpu" if lc.cpu_probs else "gpu")
            parts[res] = parts.get(res, 0.0) + slow
        else:
            out.expert_mode.append("stream")
            _overlap(parts, t_pcie, t_gs, res_gs)
        if ci.gpus > 1:
            parts["link"] = ci.link_time(T)
        out.layers.append(sum(parts.values()))
        for k, v in parts.items():
            out.by_resource[k] += v
    t_head, res = _roof(
        ci.head_bytes, ci.head_flops, r.gpu_bw, r.gpu_flops, "gpu"
    )  # last token's logits only
    out.by_resource[res] += t_head
    out.seconds = sum(out.layers) + t_head
    return out
