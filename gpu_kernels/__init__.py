"""Triton GPU kernels, each with a torch reference that CPU-only machines run instead."""

from .kv_write import write_kv, write_latent
from .mla_attention import mla_decode_attention, mla_decode_attention_reference
from .moe import fused_moe, fused_moe_reference, moe_align_block_size
from .paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_prefill_attention,
    prefill_attention,
)
from .quant import QuantLinear, QuantWeight, dequantize_weight, fp8_blocks, quant_linear, quantize_weight
from .router import select_experts, select_experts_reference

__all__ = [
    "QuantLinear",
    "QuantWeight",
    "dequantize_weight",
    "fp8_blocks",
    "fused_moe",
    "fused_moe_reference",
    "mla_decode_attention",
    "mla_decode_attention_reference",
    "moe_align_block_size",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_prefill_attention",
    "prefill_attention",
    "quant_linear",
    "quantize_weight",
    "select_experts",
    "select_experts_reference",
    "write_kv",
    "write_latent",
]
