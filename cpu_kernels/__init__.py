"""CPU kernels for routed MoE experts: packed int4/int8/bf16 weights and one fused call per layer."""

from . import _cache  # noqa: F401  (first: the kernels' on-disk cache keys on all their sources)
from .cpu_info import cpu_flags, cpu_model, has_amx, has_avx512_vnni, machine_name
from .formats import PackedExperts, dequantize, pack_experts
from .moe import DecodeCall, fused_moe, get_num_threads, set_num_threads, set_vnni
from .numa import NumaExperts, fused_moe_numa, pack_experts_numa, partition_experts

__all__ = [
    "DecodeCall",
    "NumaExperts",
    "PackedExperts",
    "cpu_flags",
    "cpu_model",
    "dequantize",
    "fused_moe",
    "fused_moe_numa",
    "get_num_threads",
    "has_amx",
    "has_avx512_vnni",
    "machine_name",
    "pack_experts",
    "pack_experts_numa",
    "partition_experts",
    "set_num_threads",
    "set_vnni",
]
