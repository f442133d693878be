"""Load a checkpoint straight into the places a plan gives its tensors.

Dense weights go to the compute device (in the plan's ``gpu_weights`` format through a
weight-only quantized linear); each MoE layer's routed experts are split: the plan's hot
experts to the device, the rest packed once for the CPU kernels, read expert by expert so
no full copy of the checkpoint is ever held in RAM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm import tqdm

from hetero.checkpoint import Checkpoint, scale_inv_name
from hetero.config import ModelSpec
from hetero.distributed import SINGLE, Parallel, ZeroExperts, check_divisible, reduce_outputs, shard_dense
from hetero.experts import CPUExperts, GPUExperts, HybridExperts, PCIeExperts, StreamedExperts
from hetero.layers import fuse_projections
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
    # fp8 GPU weights are the checkpoint's own: a linear it stores in bf16 (lm_head) stays in bf16
    fp8_as_stored: bool = False
    stream_min_tokens: int | None = None  # batches this large stream RAM experts to the GPU; None = never
    pcie_share: float = 0.0  # of a decode step's RAM experts hit, the share the GPU reads over PCIe itself
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
            fp8_as_stored=getattr(plan, "fp8_as_stored", False),
            stream_min_tokens=stream_min_tokens,
            cpu_threads=threads or None,
        )


def _expert_stack(
    ckpt: Checkpoint,
    spec: ModelSpec,
    prefix: str,
    proj: str,
    ids: list[int],
    dtype,
    buffers: dict | None = None,
) -> torch.Tensor:
    """Experts ``ids`` of one projection stacked [n, ...]; in a buffer of ``buffers`` (kept there
    and reused by the next call of no more experts) when given."""
    names = checkpoint_names(spec, f"{prefix}.mlp.experts.{proj}")
    shape = (len(ids), *ckpt.shape(names[ids[0]]))
    if buffers is None:
        out = torch.empty(shape, dtype=dtype)
    else:
        buf = buffers.get(proj)
        if buf is None or buf.shape[0] < len(ids) or buf.shape[1:] != shape[1:] or buf.dtype != dtype:
            buf = buffers[proj] = torch.empty(shape, dtype=dtype)
        out = buf[: len(ids)]
    for i, e in enumerate(ids):
        ckpt.get(names[e], dtype, out=out[i])  # written in place: no stacked copy
    return out


def pack_expert_floats(
    read, ids: list[int], fmt: str, group_size: int, symmetric: bool = True, chunk: int = 8
):
    """Pack experts ``ids`` a few at a time (float32 never held for the whole layer).

    read(sub_ids) -> (gate, up [n, I, H], down [n, H, I]) float32 numpy for those experts.
    """
    from cpu_kernels.formats import empty_packed, pack_experts

    layer = None
    for s in range(0, len(ids), chunk):
        gate, up, down = read(ids[s : s + chunk])
        if layer is None:  # the whole layer's arrays, filled chunk by chunk: no concatenated copy
            layer = empty_packed(fmt, len(ids), gate.shape[2], gate.shape[1], group_size, symmetric)
        pack_experts(gate, up, down, fmt=fmt, group_size=group_size, symmetric=symmetric, into=layer, start=s)
    return layer


_PROJ = ("gate_proj", "up_proj", "down_proj")


class CheckpointSource:
    """Weights from a Hugging Face checkpoint: dense by name, experts read and packed at load."""

    def __init__(self, path):
        self.ckpt = Checkpoint(path)
        self.path = self.ckpt.path

    def spec(self) -> ModelSpec:
        return ModelSpec.from_pretrained(self.path)

    def dense(self, spec: ModelSpec, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        return load_tensor(self.ckpt, spec, name, dtype)

    def is_quantized(self, spec: ModelSpec, name: str) -> bool:
        first = checkpoint_names(spec, name)[0]
        return first in self.ckpt and self.ckpt.raw(first).dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def fp8_weight(self, spec: ModelSpec, name: str):
        """A dense weight the checkpoint stores in e4m3 with square block scales, as stored (a
        ``gpu_kernels`` QuantWeight on the CPU), or None."""
        src = checkpoint_names(spec, name)[0]
        rows, cols = self.ckpt.fp8_block
        if src not in self.ckpt or rows != cols or self.ckpt.raw(src).dtype != torch.float8_e4m3fn:
            return None
        scale_name = scale_inv_name(src)
        if scale_name not in self.ckpt:
            return None
        from gpu_kernels import fp8_blocks

        return fp8_blocks(self.ckpt.raw(src), self.ckpt.raw(scale_name), rows)

    def expert_floats(
        self, spec: ModelSpec, layer: int, ids: list[int], dtype, device=None
    ) -> tuple[torch.Tensor, ...]:
        """Experts ``ids`` as floats: gate, up [n, I, H], down [n, H, I]; on the host (``device`` is
        where a source that can dequantize there should)."""
        prefix = f"model.layers.{layer}"
        return tuple(_expert_stack(self.ckpt, spec, prefix, w, ids, dtype) for w in _PROJ)

    def cpu_experts(self, spec: ModelSpec, layer: int, ids: list[int], p: Placement):
        """(PackedExperts, whether its local ids are the global expert ids)."""

        # One set of float32 buffers for every chunk: no page faults and frees of ~100 MB per chunk.
        buffers: dict = {}

        def read(sub):
            prefix = f"model.layers.{layer}"
            return tuple(
                _expert_stack(self.ckpt, spec, prefix, w, sub, torch.float32, buffers).numpy() for w in _PROJ
            )

        return pack_expert_floats(read, ids, p.expert_format, p.group_size), False


class ConvertedSource:
    """Weights from a converted model: dense mmapped, packed experts mapped with no repacking."""

    def __init__(self, path, verify: bool = False):
        from hetero.packed import PackedModel

        self.model = PackedModel(path, verify=verify)
        self.path = self.model.path
        self.expert_format = self.model.expert_format
        self.group_size = self.model.group_size

    def spec(self) -> ModelSpec:
        return ModelSpec.from_pretrained(self.path)

    def dense(self, spec: ModelSpec, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        t = self.model.tensor(name)
        return t if dtype is None else t.to(dtype)

    def expert_floats(
        self, spec: ModelSpec, layer: int, ids: list[int], dtype, device=None
    ) -> tuple[torch.Tensor, ...]:
        from hetero.packed import dequantize_packed

        # The packed bytes are 2-4x smaller than the floats: they cross to the device, then unpack.
        return dequantize_packed(self.model.experts(layer), ids, dtype, device)

    def cpu_experts(self, spec: ModelSpec, layer: int, ids: list[int], p: Placement):
        # All experts stay mapped and the layer addresses them by global id: experts that run
        # elsewhere are never touched, so their pages are never read.
        return self.model.experts(layer), True


def open_source(path, verify: bool = False):
    """The weight source behind ``path``: a converted dir, a GGUF file, or an HF checkpoint."""
    from hetero.packed import is_converted

    text = str(path)
    if text.endswith(".gguf"):
        from hetero.gguf import GGUFSource

        return GGUFSource(path)
    if is_converted(path):
        return ConvertedSource(path, verify=verify)
    return CheckpointSource(path)


def load_placed(
    path,
    placement: Placement,
    device: torch.device,
    dtype: torch.dtype,
    worker: CPUWorker | None = None,
    progress: bool = True,
    spec: ModelSpec | None = None,
    verify: bool = False,
    parallel: Parallel = SINGLE,
) -> Transformer:
    """Build the model from ``path`` (checkpoint, converted dir or GGUF) with its tensors where ``placement`` says.

    With ``parallel`` over several ranks, this rank's share only (see ``hetero.distributed``):
    dense weights are read into host memory and split there before they move to ``device``
    and are quantized, each rank places its own share of the device experts, and only rank 0
    reads and packs the RAM experts.
    """
    source = open_source(path, verify=verify)
    spec = spec or source.spec()
    fixed = getattr(source, "expert_format", None)
    if fixed is not None and (fixed, source.group_size) != (placement.expert_format, placement.group_size):
        # The file already fixes the experts' format; the plan's is only what it assumed.
        placement = replace(placement, expert_format=fixed, group_size=source.group_size)
    with torch.device("meta"):
        model = Transformer(spec)
    worker = worker or CPUWorker(placement.cpu_threads)
    dense = [n for n, _ in named_tensors(model) if ".mlp.experts." not in n]
    moe_layers = [i for i in spec.moe_layers]
    bar = tqdm(total=len(dense) + len(moe_layers), desc="loading", unit="tensor", disable=not progress)
    split = parallel.world_size > 1
    if split:
        check_divisible(spec, parallel.world_size)
    own = parallel.own_experts(placement.experts_on_gpu)
    # Linears the plan quantizes wait on the host and reach the device one at a time, quantized. When
    # all of them landed in bf16 first, an fp8-as-stored process reserved 124 MB more than its plan
    # at its peak (0.58 GB more than the bf16 process beside it, whose peak was 0.46 GB under).
    later = placement.gpu_weights != "bf16" and not split
    # fp8 GPU weights take the checkpoint's own where it has them (tensor-parallel shards would cut
    # its blocks); those are never dequantized on the host
    exact = getattr(source, "fp8_weight", None) if later and placement.gpu_weights == "fp8" else None
    stored = functools.cache(lambda name: exact(spec, name)) if exact else None
    shapes = {n: tuple(t.shape) for n, t in named_tensors(model)}
    with torch.no_grad():
        for name in dense:
            quantized = later and name.endswith(".weight") and _quantizable(name[: -len(".weight")])
            if quantized and stored and (w := stored(name)) is not None and tuple(w.shape) == shapes[name]:
                bar.update()
                continue  # _quantize_dense takes the stored bytes
            want = torch.float32 if keep_fp32(name) else dtype
            value = source.dense(spec, name, want)
            _set(model, name, value if split or quantized else value.to(device))
            bar.update()
        if split:
            shard_dense(model, parallel)  # on the host: the device gets only this rank's share
            for name, t in list(named_tensors(model)):
                if ".mlp.experts." not in name:
                    _set(model, name, t.to(device))
        _quantize_dense(model, placement, device, stored)
        for name, t in list(named_tensors(model)) if later else ():
            if ".mlp.experts." not in name and t.device.type != device.type:  # a host value no linear took
                _set(model, name, t.to(device))
        fuse_projections(model)  # after sharding and quantizing: what stays plain and whole fuses
        for i in moe_layers:
            moe = model.model.layers[i].mlp
            assert isinstance(moe, MoE)
            del moe.experts
            on_gpu = placement.experts_on_gpu.get(i, [])
            ram = [e for e in range(spec.num_experts) if e not in set(on_gpu)] if parallel.is_first else []
            moe.experts = _place_layer(source, spec, i, own.get(i, []), ram, placement, device, dtype, worker)
            bar.update()
        reduce_outputs(model, parallel)
    bar.close()
    model.worker = worker
    model.eval()
    return model


def _place_layer(source, spec, i, on_gpu, on_cpu, p: Placement, device, dtype, worker) -> HybridExperts:
    gpu = cpu = streamed = pcie = None
    global_ids = False
    if on_gpu:
        # The plan priced device experts in the expert format; bf16 only when that is the format.
        fmt = p.expert_format if p.expert_format != "bf16" else dtype_name(dtype)
        widths = (spec.hidden_size, spec.moe_intermediate_size)
        group = next((g for g in (p.group_size, 64, 32, 16) if all(w % g == 0 for w in widths)), 16)

        def read(lo: int, hi: int) -> tuple[torch.Tensor, ...]:
            return source.expert_floats(spec, i, on_gpu[lo:hi], dtype, device)

        gpu = GPUExperts.load(read, len(on_gpu), fmt, device, group)
    if on_cpu:
        packed, global_ids = source.cpu_experts(spec, i, on_cpu, p)
        cpu = CPUExperts(packed, CPUHandoff(worker, device, spec.hidden_size, spec.top_k, layer=i))
        if p.stream_min_tokens is not None:
            streamed = StreamedExperts(packed, device)
        if p.pcie_share > 0 and PCIeExperts.supports(packed):
            pcie = PCIeExperts(packed, device)
    if gpu is None and cpu is None:
        gpu = ZeroExperts()  # a rank that holds none of this layer's experts
    hybrid = HybridExperts(
        spec.num_experts, on_gpu, gpu, cpu, streamed, p.stream_min_tokens, pcie, p.pcie_share if pcie else 0.0
    )
    if len(on_gpu) + len(on_cpu) < spec.num_experts:
        # Other ranks hold the rest on their devices: only ``on_cpu`` may reach the RAM experts.
        ram = torch.zeros(spec.num_experts + 1, dtype=torch.bool)
        ram[on_cpu] = True
        local = torch.full((spec.num_experts + 1,), -1, dtype=torch.long)
        local[ram] = torch.arange(len(on_cpu))
        hybrid.cpu_local = local
    if global_ids:
        # The packed layer holds every expert: RAM experts keep their global ids.
        hybrid.cpu_local = torch.where(hybrid.cpu_local >= 0, torch.arange(spec.num_experts + 1), -1)
    return hybrid


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, "bf16")


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def _quantizable(module_name: str) -> bool:
    return module_name.rsplit(".", 1)[-1] in _QUANTIZABLE and ".experts" not in module_name


def _quantize_dense(model: Transformer, p: Placement, device: torch.device, fp8_weight=None) -> None:
    """The plan's GPU format for the dense linears, on ``device``: quantized from their loaded values
    (each moved there first, alone), or in fp8 with ``fp8_weight(name)`` giving the checkpoint's own
    block-scaled weight where it has one (its bytes as they are: re-quantizing the dequantized
    values per row would round them a second time)."""
    if p.gpu_weights == "bf16":
        return
    from gpu_kernels import QuantLinear

    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _quantizable(n)]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        own = fp8_weight(f"{name}.weight") if fp8_weight is not None and p.gpu_weights == "fp8" else None
        if own is not None and tuple(own.shape) == tuple(mod.weight.shape):
            bias = None if mod.bias is None else mod.bias.detach().to(device)
            setattr(parent, attr, QuantLinear(own.to(device), bias))
            continue
        mod.to(device)
        if own is None and fp8_weight is not None and p.fp8_as_stored:
            continue  # stored in bf16 (lm_head): the plan keeps it so
        group = next((g for g in (128, 64, 32) if mod.in_features % g == 0), None)
        if group is None and p.gpu_weights == "int4":
            continue  # no group size divides this width; it stays in bf16
        setattr(parent, attr, QuantLinear.from_linear(mod, p.gpu_weights, group_size=group or 128))
