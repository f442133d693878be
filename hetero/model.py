"""The transformer: embed -> blocks (attention + MLP or MoE) -> norm -> lm_head.

Module names follow the Hugging Face checkpoints, so weights load by name; the only
renames are the stacked routed experts and Mixtral's ``block_sparse_moe`` (see
``checkpoint_names``). Placement and quantization are applied to a built model
(``hetero.placement_apply``); nothing here knows where it runs.

Legend: T = tokens in the step, H = hidden, V = vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from hetero.attention import AttentionBatch, GQAttention, MLAttention
from hetero.checkpoint import Checkpoint, CheckpointError
from hetero.config import ModelSpec
from hetero.layers import MLP, RMSNorm, embedding, fuse_projections
from hetero.moe import MoE


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.self_attn = MLAttention(spec) if spec.is_mla else GQAttention(spec)
        if layer in spec.moe_layers:
            self.mlp: nn.Module = MoE(spec)
        else:
            self.mlp = MLP(spec.hidden_size, spec.intermediate_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, batch: AttentionBatch, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        x, out = self.add_forward(x, None, batch, cache)
        return x + (out if isinstance(out, torch.Tensor) else out.total())  # [T, H]

    def add_forward(
        self,
        x: torch.Tensor,
        pending: torch.Tensor | None,
        batch: AttentionBatch,
        cache: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the residual stream ``x + pending`` (the previous block's output not yet
        added): returns its residual stream after attention and its MLP's output, not yet added,
        so that each residual add runs fused with the norm after it (one kernel on CUDA). A MoE's
        output may be its addends, not yet summed (``gpu_kernels.norm.Parts``): the same kernel
        sums them."""
        from gpu_kernels.norm import add_rms_norm

        if isinstance(self.mlp, MoE):
            self.mlp.prefetch(x.shape[0])  # experts this batch streams cross PCIe during attention
        norm = self.input_layernorm
        x, h = add_rms_norm(x, pending, norm.weight, norm.eps)  # [T, H] each
        norm = self.post_attention_layernorm
        x, h = add_rms_norm(x, self.self_attn(h, batch, cache), norm.weight, norm.eps)
        return x, self.mlp(h)


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = Backbone(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv: list[tuple[torch.Tensor, ...]]):
        """input_ids [T] -> final hidden states [T, H] (after the last norm)."""
        from gpu_kernels.norm import add_rms_norm

        x, pending = self.model.embed_tokens(input_ids), None  # [T, H]
        for layer, cache in zip(self.model.layers, kv):
            x, pending = layer.add_forward(x, pending, batch, cache)
        norm = self.model.norm
        return add_rms_norm(x, pending, norm.weight, norm.eps)[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [n, V]


# ----------------------------------------------------------------------------- loading

_EXPERT = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
_MIXTRAL_W = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def checkpoint_names(spec: ModelSpec, name: str) -> list[str]:
    """The checkpoint tensor(s) behind one of our parameters or buffers (experts: one per expert)."""
    mixtral = spec.family == "mixtral"
    m = _EXPERT.match(name)
    if m:
        prefix, proj = m.groups()
        moe = f"{prefix}.block_sparse_moe" if mixtral else f"{prefix}.mlp"
        w = _MIXTRAL_W[proj] if mixtral else proj
        return [f"{moe}.experts.{e}.{w}.weight" for e in range(spec.num_experts)]
    if mixtral:
        name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
    name = name.replace(".mlp.shared.", ".mlp.shared_experts." if spec.is_mla else ".mlp.shared_expert.")
    name = name.replace(".mlp.shared_gate.", ".mlp.shared_expert_gate.")
    return [name]


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def load_tensor(ckpt: Checkpoint, spec: ModelSpec, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One parameter's value from the checkpoint (experts stacked into [E, ...])."""
    sources = checkpoint_names(spec, name)
    if spec.tie_word_embeddings and name == "lm_head.weight" and name not in ckpt:
        sources = ["model.embed_tokens.weight"]
    missing = [s for s in sources if s not in ckpt]
    if missing:
        raise CheckpointError(
            f"tensor {missing[0]!r} (for {name}) is missing from the checkpoint at {ckpt.path}"
            + (f" ({len(missing)} tensors missing in all)" if len(missing) > 1 else "")
        )
    if len(sources) == 1:
        return ckpt.get(sources[0], dtype)
    return torch.stack([ckpt.get(s, dtype) for s in sources])


def keep_fp32(name: str) -> bool:
    # Routing decides discrete choices; keep it in float32 as the reference does.
    return name.endswith(("mlp.gate.weight", "e_score_correction_bias"))


def load_model(
    path: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    spec: ModelSpec | None = None,
) -> Transformer:
    """Build the model and fill every parameter from the checkpoint at ``path``."""
    ckpt = Checkpoint(path)
    spec = spec or ModelSpec.from_pretrained(ckpt.path)
    with torch.device("meta"):
        model = Transformer(spec)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, t in named_tensors(model):
            want = torch.float32 if keep_fp32(name) else dtype
            value = load_tensor(ckpt, spec, name, want)
            if tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{name}: checkpoint holds shape {tuple(value.shape)}, config.json implies {tuple(t.shape)}"
                )
            t.data = value.to(device)
            t.requires_grad_(False)
    fuse_projections(model)
    model.eval()
    return model
