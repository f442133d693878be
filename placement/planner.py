"""Where every weight goes and how fast the result will run, decided before loading a byte.

The GPU first gets what every token needs: attention, norms, routers, shared experts, dense
layers, the input embedding and output head, the KV cache and a workspace. The embedding costs
VRAM (~1.9 GB for DeepSeek-V3) for a one-row lookup per token, but a lookup in RAM would put a
host round trip at the start of every decode step, which CUDA graphs cannot hold. Routed experts
then fill the rest of the GPU, most frequently hit first; the remainder lives in RAM, spread
evenly over the NUMA nodes.

With several GPUs (``gpus`` > 1) the budget is per GPU and the GPU part is split as the runtime
splits it: attention, shared experts and dense MLPs are divided over the GPUs (so is the KV
cache, unless all heads share it, as MLA's latent), norms, routers and the output head are
replicated on each, and the routed experts on the GPUs are dealt out over them, so they get N
times the room. The GPU side runs N times as fast, plus two all-reduces a layer
(``placement.cost.CostInputs.link_time``). Byte counts in the plan's GPU table are per GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from placement.cost import (
    PCIE_MAX_EXPERTS,
    Branch,
    CostInputs,
    LayerCost,
    Rates,
    decode_layer_time,
    decode_step_time,
    pcie_share,
    pcie_splits,
    prefill_time,
    touch_probability,
)
from placement.formats import EXPERT_FORMATS, KV_DTYPES, WEIGHT_FORMATS
from placement.hardware import HardwareProfile
from placement.inventory import Inventory, Tensor
from placement.units import GiB, MiB, fmt_bytes

GPU_KINDS = ("attention", "router", "shared_expert", "dense_mlp", "lm_head", "norm")
# Kinds whose weights several GPUs split between them; the other GPU kinds are replicated.
SPLIT_KINDS = ("attention", "shared_expert", "dense_mlp")
# CUDA context, cuBLAS workspaces and allocator slack.
GPU_BASE_RESERVE = 768 * MiB
# A quantized GPU weight multiplied by a prefill chunk is dequantized a slice of this many bytes at a
# time (gpu_kernels.quant.DEQUANT_SLICE_BYTES).
DEQUANT_SLICE = 32 * MiB
# Python, torch, numba and pinned hand-off buffers of the process itself.
CPU_RESERVE = 2 * GiB
# Prefill streams experts to the GPU in chunks of about this many packed bytes, through this many
# device buffers: the first chunks of a layer cross PCIe while its attention computes.
STREAM_CHUNK_BYTES = 32 * MiB
STREAM_SLOTS = 4
# Share of every expert's hit probability taken from uniform routing, so an expert a frequency
# file never saw is priced as rare, not as never used.
FREQ_SMOOTHING = 0.01


class PlanError(ValueError):
    """The model does not fit the budgets; the message says what is missing and what would fit."""


@dataclass
class PlanOptions:
    gpu_mem: int | None = None  # GPU bytes to use; None: the free memory of the profile's GPU
    cpu_mem: int | None = None  # RAM bytes to use; None: what is available now
    gpus: int = 1  # GPUs the GPU part is split over; gpu_mem is per GPU
    context: int = 4096  # tokens per sequence the KV cache is reserved for
    batch: int = 1  # sequences decoded together
    experts: str = "int4"  # routed expert format: bf16 | int8 | int4
    group_size: int = 128  # int4 quantization group
    gpu_weights: str = "auto"  # auto (the most precise that fits) | bf16 | fp8 | int8 | int4
    # The checkpoint's layers hold their linear weights in block-scaled fp8 that this GPU computes
    # with as stored: fp8 then loses nothing (lm_head, stored in bf16, stays in bf16), and auto
    # starts from it, as bf16 would only take twice the bytes for the same values.
    stored_fp8: bool = False
    kv_dtype: str = "bf16"
    freq: str | dict | None = None  # {"layer": {"expert": count or probability}} or a JSON file of it
    workspace: int | None = None  # GPU bytes for activations and staging; None: sized from the model
    prefill_tokens: int = 2048  # prompt length at which prefill speed is predicted
    # Share of a decode step's RAM expert reads the GPU takes itself over PCIe (one GPU, int4 / int8
    # experts); 0: none (the default: on the reference machine it did not pay, see placement.cost);
    # None: the share that balances the two rates
    pcie_share: float | None = 0.0
    expert_freq: dict[int, dict[int, float]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.experts not in EXPERT_FORMATS:
            raise PlanError(f"expert format {self.experts!r} is not one of {', '.join(EXPERT_FORMATS)}")
        if self.gpu_weights != "auto" and self.gpu_weights not in WEIGHT_FORMATS:
            raise PlanError(
                f"GPU weight format {self.gpu_weights!r} is not auto or one of {', '.join(WEIGHT_FORMATS)}"
            )
        if self.kv_dtype not in KV_DTYPES:
            raise PlanError(f"KV-cache dtype {self.kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        gs = self.group_size
        if not (isinstance(gs, int) and 16 <= gs <= 4096 and gs & (gs - 1) == 0):
            raise PlanError(f"group size must be a power of two from 16 to 4096, got {gs}")
        for name in ("gpus", "context", "batch", "prefill_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise PlanError(f"{name} must be a positive integer, got {v!r}")
        if self.pcie_share is not None and not 0 <= self.pcie_share < 1:
            raise PlanError(f"pcie_share must be in [0, 1) or None (balanced), got {self.pcie_share!r}")
        for name in ("gpu_mem", "cpu_mem", "workspace"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise PlanError(f"{name} must be a number of bytes, got {v!r}")
        if self.freq is not None:
            self.expert_freq = _read_freq(self.freq)

    def summary(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "expert_freq"}
        if isinstance(d["freq"], dict):
            d["freq"] = "(mapping)"
        return d


def _read_freq(src: str | dict) -> dict[int, dict[int, float]]:
    if isinstance(src, (str, Path)):
        try:
            data = json.loads(Path(src).read_text())
        except OSError as e:
            raise PlanError(f"cannot read the expert-frequency file {src}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"expert-frequency file {src} is not valid JSON: {e}") from None
    else:
        data = src
    where = f"expert frequencies ({src})" if isinstance(src, (str, Path)) else "expert frequencies"
    if not isinstance(data, dict):
        raise PlanError(f'{where}: expected {{"layer": {{"expert": count}}}}, got {type(data).__name__}')
    out: dict[int, dict[int, float]] = {}
    for layer, experts in data.items():
        if not isinstance(experts, dict):
            raise PlanError(
                f'{where}: layer {layer!r} must map expert ids to counts, like {{"0": 12, "5": 3}}'
            )
        try:
            row = {int(e): float(c) for e, c in experts.items()}
            out[int(layer)] = row
        except (TypeError, ValueError):
            raise PlanError(f"{where}: layer {layer!r}: keys must be integers and values numbers") from None
        if any(c < 0 or not math.isfinite(c) for c in row.values()):
            raise PlanError(f"{where}: layer {layer}: counts must be finite and non-negative")
    return out


@dataclass
class Plan:
    model: str
    placement: dict[str, str]  # tensor name -> "gpu" | "cpu" | "cpu:<numa node>"
    gpu_bytes: int  # weights + KV cache + workspace
    cpu_bytes: int  # weights + runtime reserve
    gpu_budget: int
    cpu_budget: int
    gpu_weights: str  # format of the GPU-resident non-expert weights
    expert_format: str
    group_size: int
    kv_dtype: str
    kv_cache_bytes: int
    kv_tokens: int
    workspace_bytes: int
    experts_on_gpu: dict[int, list[int]]  # every MoE layer -> expert ids resident on the GPU
    cpu_bytes_per_node: dict[int, int]  # routed experts in RAM, per NUMA node
    cpu_threads_per_node: dict[int, int]
    gpu_breakdown: dict[str, int]  # bytes by kind (+ kv_cache, workspace)
    cpu_breakdown: dict[str, int]
    predicted: dict[str, Any]
    options: dict[str, Any]
    profile: dict[str, Any]
    cost_inputs: CostInputs

    @property
    def fp8_as_stored(self) -> bool:
        """fp8 GPU weights that are the checkpoint's own block-scaled ones (lm_head in bf16)."""
        return self.gpu_weights == "fp8" and bool(self.options.get("stored_fp8"))

    def to_json(self, indent: int | None = None) -> str:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["cost_inputs"] = self.cost_inputs.to_dict()
        return json.dumps(d, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        d["cost_inputs"] = CostInputs.from_dict(d["cost_inputs"])
        for k in ("experts_on_gpu", "cpu_bytes_per_node", "cpu_threads_per_node"):
            d[k] = {int(i): v for i, v in d[k].items()}
        return cls(**d)


# --------------------------------------------------------------------------- planning


def make_plan(inv: Inventory, profile: HardwareProfile, opts: PlanOptions | None = None) -> Plan:
    opts = opts or PlanOptions()
    gpu_budget = opts.gpu_mem if opts.gpu_mem is not None else profile.gpu.free_bytes  # per GPU
    cpu_budget = opts.cpu_mem if opts.cpu_mem is not None else min(profile.ram_available, profile.ram_bytes)
    probs = expert_probs(inv, opts.expert_freq)
    experts = inv.experts()
    eb = _expert_bytes(experts, opts.experts, opts.group_size)
    kv_bytes = inv.kv_elems_per_token * KV_DTYPES[opts.kv_dtype] * inv.num_layers * opts.context * opts.batch
    kv_gpu = -(-kv_bytes // opts.gpus) if inv.kv_per_head else kv_bytes  # on each GPU
    workspace = opts.workspace if opts.workspace is not None else workspace_bytes(inv, opts, eb)
    fixed = [t for t in inv.tensors if _on_gpu_always(t, inv)]
    fmt, mandatory = _pick_gpu_format(inv, fixed, opts, gpu_budget, kv_gpu, workspace)

    rates = Rates.from_profile(profile, opts.gpus, opts.experts, opts.batch, inv.top_k, inv.num_experts)
    ctx = max(
        1, opts.context // 2
    )  # a sequence growing to `context` spends its decode at half of it on average
    base = _layer_costs(inv, fmt, opts, probs, eb)
    room = gpu_budget - mandatory - kv_gpu - workspace
    if opts.gpus > 1 and eb:
        # Experts are dealt out evenly: each GPU must have room for its whole share.
        room = opts.gpus * (max(room, 0) // eb) * eb
    on_gpu = _fill_experts(inv, base, probs, eb, room, rates, opts, ctx)

    placement: dict[str, str] = {t.name: "gpu" for t in fixed}
    cpu_nodes = [n.id for n in profile.numa_nodes]
    per_node = dict.fromkeys(cpu_nodes, 0)
    counter = 0
    for (layer, e), ts in sorted(experts.items()):
        if e in on_gpu[layer]:
            where = "gpu"
        else:
            # Round-robin over a global counter: node totals differ by at most one expert, and each
            # layer's experts are spread over all nodes so every memory controller works every layer.
            node = cpu_nodes[counter % len(cpu_nodes)]
            counter += 1
            per_node[node] += eb
            where = f"cpu:{node}"
        for t in ts:
            placement[t.name] = where
    for t in inv.tensors:
        placement.setdefault(t.name, "cpu")

    gpu_br, cpu_br = _breakdown(inv, placement, fmt, opts)
    if opts.gpus > 1 and "routed_expert" in gpu_br:
        gpu_br["routed_expert"] = (
            -(-sum(len(v) for v in on_gpu.values()) // opts.gpus) * eb
        )  # the fullest GPU
    gpu_br.update(kv_cache=kv_gpu, workspace=workspace)
    cpu_br["runtime_reserve"] = CPU_RESERVE
    gpu_bytes, cpu_bytes = sum(gpu_br.values()), sum(cpu_br.values())
    assert gpu_bytes <= gpu_budget, "expert filling overran the GPU budget"
    if cpu_bytes > cpu_budget:
        raise PlanError(_cpu_message(inv, opts, cpu_bytes, cpu_budget, cpu_br, experts, on_gpu, gpu_budget))

    layers = tuple(
        dataclasses.replace(
            lc,
            gpu_probs=tuple(probs[i][e] for e in on_gpu[i]) if i in probs else (),
            cpu_probs=tuple(p for e, p in enumerate(probs[i]) if e not in on_gpu[i]) if i in probs else (),
        )
        for i, lc in enumerate(base)
    )
    ci = CostInputs(
        layers,
        _head_bytes(inv, fmt, opts),
        _head_flops(inv),
        inv.hidden_size,
        rates,
        ctx,
        opts.batch,
        gpus=opts.gpus,
        pcie_share=pcie_share(rates, opts.experts, opts.gpus, opts.pcie_share),
        top_k=inv.top_k,
        ram_bw=profile.cpu_read_bw,
    )
    dec = decode_step_time(ci, 1)
    pre = prefill_time(ci, min(opts.prefill_tokens, opts.context))
    moe_modes = [m for i, m in enumerate(pre.expert_mode) if i in set(inv.moe_layers)]
    predicted = {
        "decode_tok_s": opts.batch / dec.seconds,
        "decode_bound": dec.bound,
        "decode_ms_per_token_step": dec.seconds * 1e3,
        "decode_context": ctx,
        "decode_seconds_by_resource": {k: v for k, v in dec.by_resource.items() if v},
        "prefill_tok_s": pre.tok_s,
        "prefill_bound": pre.bound,
        "prefill_tokens": pre.tokens,
        "prefill_streamed_layers": moe_modes.count("stream"),
        "prefill_cpu_layers": moe_modes.count("cpu"),
        "decode_ms_per_layer": [round(t * 1e3, 4) for t in dec.layers],
        # share of the routed token-expert choices that the GPU's experts serve (by ``probs``: the
        # expert frequencies when given, else uniform routing)
        "gpu_expert_share": gpu_expert_share(probs, on_gpu, inv.top_k),
    }
    return Plan(
        model=inv.model,
        placement=placement,
        gpu_bytes=gpu_bytes,
        cpu_bytes=cpu_bytes,
        gpu_budget=gpu_budget,
        cpu_budget=cpu_budget,
        gpu_weights=fmt,
        expert_format=opts.experts,
        group_size=opts.group_size,
        kv_dtype=opts.kv_dtype,
        kv_cache_bytes=kv_gpu,
        kv_tokens=opts.context * opts.batch,
        workspace_bytes=workspace,
        experts_on_gpu={i: sorted(on_gpu[i]) for i in inv.moe_layers},
        cpu_bytes_per_node=per_node,
        cpu_threads_per_node=cpu_worker_threads(profile),
        gpu_breakdown=gpu_br,
        cpu_breakdown=cpu_br,
        predicted=predicted,
        options=opts.summary(),
        profile=profile_summary(profile),
        cost_inputs=ci,
    )


def expert_probs(inv: Inventory, freq: dict[int, dict[int, float]] | None) -> dict[int, list[float]]:
    """Per MoE layer, each expert's chance of being picked by one token (summing to top_k)."""
    E, k = inv.num_experts, inv.top_k
    uniform = [k / E] * E
    out = {i: list(uniform) for i in inv.moe_layers}
    for layer, row in (freq or {}).items():
        if layer not in out:
            raise PlanError(f"expert frequencies name layer {layer}, which is not a MoE layer of {inv.model}")
        bad = [e for e in row if not 0 <= e < E]
        if bad:
            raise PlanError(
                f"expert frequencies: layer {layer} names expert {bad[0]}, but {inv.model} has {E}"
            )
        total = sum(row.values())
        if total <= 0:
            continue
        shares = [(1 - FREQ_SMOOTHING) * row.get(e, 0.0) / total + FREQ_SMOOTHING / E for e in range(E)]
        out[layer] = [min(1.0, k * s) for s in shares]
    return out


def gpu_expert_share(probs: dict[int, list[float]], on_gpu: dict[int, set | list], top_k: int) -> float:
    """Mean over MoE layers of the share of a token's routed choices that land on GPU experts."""
    if not probs or top_k <= 0:
        return 0.0
    return sum(sum(row[e] for e in on_gpu.get(i, ())) / top_k for i, row in probs.items()) / len(probs)


def workspace_bytes(inv: Inventory, opts: PlanOptions, expert_bytes: int) -> int:
    """GPU memory besides weights and KV cache: allocator slack, prefill activations, the logits
    of a decode batch and what streaming experts during prefill holds at once."""
    inter = max(
        (t.shape[0] for t in inv.tensors if t.kind in ("dense_mlp", "shared_expert") and len(t.shape) == 2),
        default=0,
    )
    tokens = min(opts.prefill_tokens, opts.context)
    activations = tokens * (12 * inv.hidden_size + 4 * inter) * 2
    rows = opts.batch * 8  # decode rows: up to 8 a sequence (verifying drafted tokens)
    # bf16 logits, their float32 copy and the sampler's probabilities
    logits = rows * inv.vocab_size * (2 + 4 + 4)
    # CUDA graphs keep each captured segment's activations in their pool: about 9 hidden-sized
    # bf16 vectors per row and layer (135 MB measured at 144 rows on the V2-Lite shape)
    graphs = rows * inv.num_layers * 9 * inv.hidden_size * 2
    # a PCIe share of decode gathers the GPU's RAM experts into PCIE_MAX_EXPERTS slots first
    shares = pcie_splits(opts.experts, opts.gpus, opts.pcie_share) and inv.moe_layers
    gather = PCIE_MAX_EXPERTS * expert_bytes if shares else 0
    return (
        GPU_BASE_RESERVE
        + activations
        + logits
        + graphs
        + gather
        + DEQUANT_SLICE
        + stream_bytes(inv, tokens, expert_bytes)
    )


def stream_bytes(inv: Inventory, tokens: int, expert_bytes: int) -> int:
    """Device bytes of streamed prefill: STREAM_SLOTS chunks of packed experts in flight, one
    chunk unpacked to bf16 and the fused MoE's per-slot buffers for ``tokens`` tokens."""
    if not inv.moe_layers or expert_bytes <= 0:
        return 0
    unpacked = _expert_bytes(inv.experts(), "bf16", 128)  # 3 * H * I * 2
    moe_inter = unpacked // (6 * inv.hidden_size)
    per_chunk = max(1, STREAM_CHUNK_BYTES // expert_bytes)
    slots = tokens * inv.top_k * (inv.hidden_size + moe_inter) * 2  # [T*K, I] and [T*K, H] in bf16
    return STREAM_SLOTS * per_chunk * expert_bytes + per_chunk * unpacked + slots


def profile_summary(p: HardwareProfile) -> dict[str, Any]:
    g = p.gpu
    return {
        "gpu": g.name,
        "gpu_total_bytes": g.total_bytes,
        "gpu_hbm_bw": g.hbm_bw,
        "gpu_bf16_flops": g.bf16_flops,
        "gpus_present": len(p.gpus),
        "pcie_pinned_bw": p.h2d_pinned_bw,
        "cpu_model": p.cpu_model,
        "physical_cores": p.physical_cores,
        "numa_nodes": len(p.numa_nodes),
        "ram_bytes": p.ram_bytes,
        "cpu_read_bw": p.cpu_read_bw,
        # the CPU expert kernels' measured decode rates by format ("int4", "int4@16"; bytes/s)
        "cpu_kernel_bw": dict(p.cpu_kernel_bw),
        "cpu_flops": p.cpu_flops,
        "isa": list(p.isa),
        "measured": list(p.measured),
        "overridden": list(p.overridden),
    }


def _on_gpu_always(t: Tensor, inv: Inventory) -> bool:
    return t.kind in GPU_KINDS or t.kind == "embed"


def _fmt_for(t: Tensor, gpu_fmt: str, opts: PlanOptions) -> str:
    if t.kind == "routed_expert":
        return opts.experts
    if t.kind == "embed":
        return "bf16"  # looked up, never multiplied: no reason to lose precision
    if t.kind == "lm_head" and gpu_fmt == "fp8" and opts.stored_fp8:
        return "bf16"  # fp8 as stored: the checkpoint's lm_head is bf16
    return gpu_fmt


def _tensor_bytes(t: Tensor, inv: Inventory, gpu_fmt: str, opts: PlanOptions) -> int:
    if t.kind == "embed" and inv.tied_embeddings:
        return t.nbytes(gpu_fmt, opts.group_size)
    return t.nbytes(_fmt_for(t, gpu_fmt, opts), opts.group_size)


def _per_gpu_bytes(t: Tensor, inv: Inventory, gpu_fmt: str, opts: PlanOptions) -> int:
    """Bytes of a GPU-resident non-expert tensor on each GPU: split kinds divided, the rest whole."""
    n = _tensor_bytes(t, inv, gpu_fmt, opts)
    return -(-n // opts.gpus) if t.kind in SPLIT_KINDS else n


def _expert_bytes(experts: dict[tuple[int, int], list[Tensor]], fmt: str, gs: int) -> int:
    sizes = {sum(t.nbytes(fmt, gs) for t in ts) for ts in experts.values()}
    if len(sizes) > 1:
        raise PlanError(
            f"routed experts differ in size ({sorted(sizes)[:3]}...); the planner needs them equal"
        )
    return sizes.pop() if sizes else 0


def _pick_gpu_format(
    inv: Inventory, fixed: list[Tensor], opts: PlanOptions, budget: int, kv: int, ws: int
) -> tuple[str, int]:
    candidates = (opts.gpu_weights,)
    if opts.gpu_weights == "auto":
        candidates = WEIGHT_FORMATS[1:] if opts.stored_fp8 else WEIGHT_FORMATS
    need = {}
    for fmt in candidates:
        need[fmt] = sum(_per_gpu_bytes(t, inv, fmt, opts) for t in fixed)
        if need[fmt] + kv + ws <= budget:
            return fmt, need[fmt]
    fmt = candidates[-1]
    total = need[fmt] + kv + ws
    lines = [
        f"GPU: {inv.model} needs {fmt_bytes(total)} on "
        + ("the GPU" if opts.gpus == 1 else f"each of {opts.gpus} GPUs")
        + f" ({fmt} attention/shared/dense weights "
        f"{fmt_bytes(need[fmt])} + KV cache {fmt_bytes(kv)} for {opts.context} tokens x {opts.batch} "
        f"sequences in {opts.kv_dtype} + workspace {fmt_bytes(ws)}), but the GPU budget is "
        f"{fmt_bytes(budget)}: {fmt_bytes(total - budget)} missing."
    ]
    fits = []
    if fmt != "int4":
        n4 = sum(_per_gpu_bytes(t, inv, "int4", opts) for t in fixed)
        if n4 + kv + ws <= budget:
            fits.append(f"--gpu-weights int4 (needs {fmt_bytes(n4 + kv + ws)})")
    per_token = kv / (opts.context * opts.batch)
    room = budget - need[fmt] - ws
    if room > 0 and room // (per_token * opts.batch) >= 1:
        fits.append(f"--context {int(room // (per_token * opts.batch))} (a smaller KV cache)")
    if (
        opts.kv_dtype in ("bf16", "fp16", "fp32")
        and need[fmt] + kv // (KV_DTYPES[opts.kv_dtype]) + ws <= budget
    ):
        fits.append("--kv-dtype fp8")
    fits.append(f"a GPU budget of at least {fmt_bytes(total)}")
    raise PlanError(" ".join(lines) + " What would fit: " + "; ".join(fits) + ".")


def _layer_costs(
    inv: Inventory, fmt: str, opts: PlanOptions, probs: dict[int, list[float]], eb: int
) -> list[LayerCost]:
    pre_b = [0.0] * inv.num_layers
    pre_f = [0.0] * inv.num_layers
    mlp_b = [0.0] * inv.num_layers
    mlp_f = [0.0] * inv.num_layers
    ef = 0.0
    for t in inv.tensors:
        if t.layer is None:
            continue
        flops = 2 * t.params if t.is_matmul else 0
        if t.kind in ("shared_expert", "dense_mlp"):
            mlp_b[t.layer] += _tensor_bytes(t, inv, fmt, opts)
            mlp_f[t.layer] += flops
        elif t.kind == "routed_expert":
            if t.expert == 0 and t.layer == inv.moe_layers[0]:
                ef += flops
        else:
            pre_b[t.layer] += _tensor_bytes(t, inv, fmt, opts)
            pre_f[t.layer] += flops
    kv = inv.kv_elems_per_token * KV_DTYPES[opts.kv_dtype]
    return [
        LayerCost(
            pre_b[i],
            pre_f[i],
            mlp_b[i],
            mlp_f[i],
            eb if i in probs else 0.0,
            ef if i in probs else 0.0,
            (),
            tuple(probs.get(i, ())),
            kv,
            inv.attn_flops_per_pos_decode,
            inv.attn_flops_per_pos_prefill,
        )
        for i in range(inv.num_layers)
    ]


def _fill_experts(
    inv: Inventory,
    base: list[LayerCost],
    probs: dict[int, list[float]],
    eb: int,
    room: int,
    rates: Rates,
    opts: PlanOptions,
    ctx: int,
) -> dict[int, set[int]]:
    """Greedy, hottest first, round-robin over layers on ties; an expert moves only if that does not
    slow its layer down, and filling stops at the first expert that does not fit. Both rules make
    each plan a prefix of the plan for any larger budget, so more memory never costs decode speed."""
    on_gpu: dict[int, set[int]] = {i: set() for i in inv.moe_layers}
    if eb <= 0:
        return on_gpu
    n = opts.batch
    order = []
    for layer, ps in probs.items():
        ranked = sorted(range(len(ps)), key=lambda e: (-ps[e], e))
        order += [(-touch_probability(ps[e], n), rank, layer, e) for rank, e in enumerate(ranked)]
    order.sort()
    gpu = {i: Branch(n) for i in probs}
    cpu = {i: Branch.of(tuple(probs[i]), n) for i in probs}
    times = {i: _t(base[i], gpu[i], cpu[i], rates, inv, n, ctx) for i in probs}
    for _, _, layer, e in order:
        if room < eb:
            break
        p = probs[layer][e]
        gpu[layer].add(p)
        cpu[layer].add(p, -1)
        t = _t(base[layer], gpu[layer], cpu[layer], rates, inv, n, ctx)
        if t <= times[layer] * (1 + 1e-12):
            times[layer] = t
            on_gpu[layer].add(e)
            room -= eb
        else:
            gpu[layer].add(p, -1)
            cpu[layer].add(p)
    return on_gpu


def _t(lc: LayerCost, gpu: Branch, cpu: Branch, rates: Rates, inv: Inventory, batch: int, ctx: int) -> float:
    return decode_layer_time(lc, gpu, cpu, rates, inv.hidden_size, batch, ctx)[0]


def _head_bytes(inv: Inventory, fmt: str, opts: PlanOptions) -> float:
    return sum(
        _tensor_bytes(t, inv, fmt, opts)
        for t in inv.tensors
        if t.layer is None and (t.kind in ("lm_head", "norm") or (t.kind == "embed" and inv.tied_embeddings))
    )


def _head_flops(inv: Inventory) -> float:
    return sum(
        2 * t.params
        for t in inv.tensors
        if t.layer is None and (t.kind == "lm_head" or (t.kind == "embed" and inv.tied_embeddings))
    )


def _breakdown(
    inv: Inventory, placement: dict[str, str], fmt: str, opts: PlanOptions
) -> tuple[dict[str, int], dict[str, int]]:
    gpu: dict[str, int] = {}
    cpu: dict[str, int] = {}
    for t in inv.tensors:
        on_gpu = placement[t.name] == "gpu"
        side = gpu if on_gpu else cpu
        n = _per_gpu_bytes(t, inv, fmt, opts) if on_gpu else _tensor_bytes(t, inv, fmt, opts)
        side[t.kind] = side.get(t.kind, 0) + n
    return gpu, cpu


def cpu_worker_threads(profile: HardwareProfile) -> dict[int, int]:
    """Threads of the CPU expert workers on each NUMA node: its physical cores, but one of the
    first node's, left to the host thread that drives the GPU (it launches the next decode step
    while the worker runs this one's experts). On the H200 machine with steps launched ahead, one
    thread more made Qwen3-30B-A3B int4 5% faster on one instance and DeepSeek-V2-Lite int4 0-5%
    slower on two (``decode_overlap-*-int4*.json``), so the rule stays."""
    logical = sum(len(n.cpus) for n in profile.numa_nodes)
    out = {}
    for i, node in enumerate(profile.numa_nodes):
        cores = max(1, round(profile.physical_cores * len(node.cpus) / logical))
        out[node.id] = cores - 1 if i == 0 and cores > 2 else cores
    return out


def _cpu_message(
    inv: Inventory,
    opts: PlanOptions,
    need: int,
    budget: int,
    br: dict[str, int],
    experts: dict[tuple[int, int], list[Tensor]],
    on_gpu: dict[int, set[int]],
    gpu_budget: int,
) -> str:
    n_cpu = len(experts) - sum(len(s) for s in on_gpu.values())
    missing = need - budget
    parts = ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in br.items())
    msg = (
        f"RAM: {inv.model} needs {fmt_bytes(need)} of RAM ({n_cpu} routed experts in {opts.experts}; {parts}), "
        f"but the RAM budget is {fmt_bytes(budget)}: {fmt_bytes(missing)} missing."
    )
    fits = []
    here = _expert_bytes(experts, opts.experts, opts.group_size)
    for fmt in EXPERT_FORMATS[EXPERT_FORMATS.index(opts.experts) + 1 :]:
        smaller = need - n_cpu * (here - _expert_bytes(experts, fmt, opts.group_size))
        if smaller <= budget:
            fits.append(f"--experts {fmt} (needs {fmt_bytes(smaller)} of RAM)")
    fits.append(f"a RAM budget of at least {fmt_bytes(need)} (--cpu-mem {math.ceil(need / GiB)}GiB)")
    fits.append(
        f"or {fmt_bytes(missing)} more GPU memory for experts (a GPU budget of {fmt_bytes(gpu_budget + missing)})"
    )
    return msg + " What would fit: " + "; ".join(fits) + "."
