"""Load a checkpoint straight into the places a plan gives its tensors.

Dense weights go to the compute device (in the plan's ``gpu_weights`` format through a
weight-only quantized linear); each MoE layer's routed experts are split: the plan's hot
experts to the device, the rest packed once for the CPU kernels, read expert by expert so
no full copy of the checkpoint is ever held in RAM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hetero.checkpoint import Checkpoint
from hetero.config import ModelSpec
from hetero.experts import CPUExperts, GPUExperts, HybridExperts, StreamedExperts
from hetero.model import Transformer, checkpoint_names, keep_fp32, load_tensor, named_tensors
from hetero.moe import MoE
from hetero.pipeline import CPUHandoff, CPUWorker

EXPERT_FORMATS = ("bf16", "int8", "int4")
GPU_FORMATS = ("bf16", "fp8", "int8", "int4")
# Dense linears whose weights the quantized linear may hold. kv_b_proj stays unquantized:
# MLA's absorbed form reads its weight directly, and it is small.
_QUANTIZABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa")
_QUANTIZABLE += ("gate_proj", "up_proj", "down_proj", "lm_head")


@dataclass
class Placement:
    """What loading needs from a plan: which experts sit on the device, and the formats."""

    experts_on_gpu: dict[int, list[int]] = field(default_factory=dict)
    expert_format: str = "int4"
    group_size: int = 64
    gpu_weights: str = "bf16"
    stream_min_tokens: int | None = None  # batches this large stream RAM experts to the GPU; None = never
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.expert_format not in EXPERT_FORMATS:
            raise ValueError(f"expert format {self.expert_format!r}: choose one of {EXPERT_FORMATS}")
        if self.gpu_weights not in GPU_FORMATS:
            raise ValueError(f"gpu weight format {self.gpu_weights!r}: choose one of {GPU_FORMATS}")
        self.experts_on_gpu = {int(k): sorted(int(e) for e in v) for k, v in self.experts_on_gpu.items()}

    @classmethod
    def from_plan(cls, plan, stream_min_tokens: int | None = None) -> Placement:
        threads = getattr(plan, "cpu_threads_per_node", None)
        if isinstance(threads, dict):
            threads = sum(int(v) for v in threads.values())
        elif isinstance(threads, list | tuple):
            threads = sum(int(v) for v in threads)
        return cls(
            experts_on_gpu=dict(plan.experts_on_gpu),
            expert_format=plan.expert_format,
            group_size=plan.group_size,
            gpu_weights=plan.gpu_weights,
            stream_min_tokens=stream_min_tokens,
            cpu_threads=threads or None,
        )


def _expert_stack(
    ckpt: Checkpoint, spec: ModelSpec, prefix: str, proj: str, ids: list[int], dtype
) -> torch.Tensor:
    names = checkpoint_names(spec, f"{prefix}.mlp.experts.{proj}")
    return torch.stack([ckpt.get(names[e], dtype) for e in ids])


def _pack_cpu_experts(
    ckpt: Checkpoint, spec: ModelSpec, prefix: str, ids: list[int], p: Placement, chunk: int = 8
):
    """Pack experts ``ids`` a few at a time (float32 never held for the whole layer)."""
    import cpu_kernels

    parts = []
    for s in range(0, len(ids), chunk):
        sub = ids[s : s + chunk]
        gate, up, down = (_expert_stack(ckpt, spec, prefix, w, sub, torch.float32).numpy() for w in _PROJ)
        parts.append(cpu_kernels.pack_experts(gate, up, down, fmt=p.expert_format, group_size=p.group_size))
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    arrays = {}
    for name in ("gate_up", "down", "gate_up_scale", "down_scale", "gate_up_zero", "down_zero"):
        pieces = [getattr(x, name) for x in parts]
        per_expert = pieces[0].shape[0] == len(ids[:chunk]) and pieces[0].ndim > 1
        arrays[name] = np.concatenate(pieces) if per_expert else pieces[0]
    return type(first)(
        first.fmt, first.group_size, len(ids), first.H, first.I, **arrays, symmetric=first.symmetric
    )


_PROJ = ("gate_proj", "up_proj", "down_proj")


def load_placed(
    path,
    placement: Placement,
    device: torch.device,
    dtype: torch.dtype,
    worker: CPUWorker | None = None,
    progress: bool = True,
    spec: ModelSpec | None = None,
) -> Transformer:
    """Build the model from the checkpoint at ``path`` with its tensors where ``placement`` says."""
    ckpt = Checkpoint(path)
    spec = spec or ModelSpec.from_pretrained(ckpt.path)
    with torch.device("meta"):
        model = Transformer(spec)
    worker = worker or CPUWorker(placement.cpu_threads)
    dense = [n for n, _ in named_tensors(model) if ".mlp.experts." not in n]
    moe_layers = [i for i in spec.moe_layers]
    bar = tqdm(total=len(dense) + len(moe_layers), desc="loading", unit="tensor", disable=not progress)
    with torch.no_grad():
        for name in dense:
            want = torch.float32 if keep_fp32(name) else dtype
            value = load_tensor(ckpt, spec, name, want).to(device)
            _set(model, name, value)
            bar.update()
        _quantize_dense(model, placement)
        for i in moe_layers:
            moe = model.model.layers[i].mlp
            assert isinstance(moe, MoE)
            del moe.experts
            moe.experts = _place_layer(ckpt, spec, i, placement, device, dtype, worker)
            bar.update()
    bar.close()
    model.worker = worker
    model.eval()
    return model


def _place_layer(ckpt, spec, i, p: Placement, device, dtype, worker) -> HybridExperts:
    prefix = f"model.layers.{i}"
    on_gpu = p.experts_on_gpu.get(i, [])
    on_cpu = [e for e in range(spec.num_experts) if e not in set(on_gpu)]
    gpu = cpu = streamed = None
    if on_gpu:
        gate, up, down = (_expert_stack(ckpt, spec, prefix, w, on_gpu, dtype) for w in _PROJ)
        # The plan priced device experts in the expert format; bf16 only when that is the format.
        fmt = p.expert_format if p.expert_format != "bf16" else dtype_name(dtype)
        widths = (spec.hidden_size, spec.moe_intermediate_size)
        group = next((g for g in (p.group_size, 64, 32, 16) if all(w % g == 0 for w in widths)), 16)
        gpu = GPUExperts(gate, up, down, fmt=fmt, device=device, group_size=group)
    if on_cpu:
        packed = _pack_cpu_experts(ckpt, spec, prefix, on_cpu, p)
        cpu = CPUExperts(packed, CPUHandoff(worker, device, spec.hidden_size, spec.top_k, layer=i))
        if p.stream_min_tokens is not None:
            streamed = StreamedExperts(packed, device)
    return HybridExperts(spec.num_experts, on_gpu, gpu, cpu, streamed, p.stream_min_tokens)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def _quantize_dense(model: Transformer, p: Placement) -> None:
    if p.gpu_weights == "bf16":
        return
    from gpu_kernels import QuantLinear

    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in _QUANTIZABLE and ".experts" not in name
    ]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        group = next((g for g in (128, 64, 32) if mod.in_features % g == 0), None)
        if group is None and p.gpu_weights == "int4":
            continue  # no group size divides this width; it stays in bf16
        setattr(parent, attr, QuantLinear.from_linear(mod, p.gpu_weights, group_size=group or 128))
