"""DeepSeek-V3's multi-token-prediction (MTP) module as a drafter for speculative decoding.

The checkpoint appends one extra layer L = num_hidden_layers. At position i it reads the main
model's final hidden state h_i and the embedding of the next token t_{i+1}, and predicts t_{i+2}
(DeepSeek-V3 technical report, arXiv:2412.19437, section 2.2):

    x_i = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])
    x_i = decoder_layer(x_i)                       # attention over the MTP layer's own cache, MoE
    p(t_{i+2}) = softmax(shared_head.head(shared_head.norm(x_i)))

Drafts beyond the first feed the module's own output back in as h (one MTP layer, used again).
Legend: T = positions run this call, H = hidden, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from hetero.attention import AttentionBatch
from hetero.checkpoint import Checkpoint
from hetero.config import ModelSpec
from hetero.errors import HeteroError
from hetero.kv_cache import BlockTable, KVCache
from hetero.layers import RMSNorm, embedding
from hetero.model import Block, keep_fp32, load_tensor, named_tensors
from hetero.moe import MoE


class SharedHead(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)


class MTPLayer(Block):
    """A decoder layer with MoE, plus the input projections and output head of the MTP module."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec, spec.num_layers)
        self.mlp = MoE(spec)  # the MTP layer is always a MoE layer
        h = spec.hidden_size
        self.embed_tokens = embedding(spec.vocab_size, h)
        self.enorm = RMSNorm(h, spec.rms_norm_eps)
        self.hnorm = RMSNorm(h, spec.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = SharedHead(spec)

    def step(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, batch: AttentionBatch, cache
    ) -> torch.Tensor:
        """hidden [T, H] (main model at positions i), next_ids [T] (tokens i + 1) -> [T, H]."""
        x = torch.cat([self.enorm(self.embed_tokens(next_ids)), self.hnorm(hidden)], dim=-1)  # [T, 2H]
        return super().forward(self.eh_proj(x), batch, cache)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared_head.head(self.shared_head.norm(x)).float()  # [T, V]


def load_mtp(path, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str) -> MTPLayer:
    if spec.family != "deepseek_v3" or spec.num_nextn_predict_layers < 1:
        raise HeteroError(
            f"--speculate mtp needs a DeepSeek-V3 checkpoint with a multi-token-prediction layer; "
            f"this is {spec.family} with num_nextn_predict_layers={spec.num_nextn_predict_layers}. "
            "Use --speculate ngram or draft:DIR"
        )
    ckpt = Checkpoint(path)
    with torch.device("meta"):
        layer = MTPLayer(spec)
    layer.to_empty(device=device)
    prefix = f"model.layers.{spec.num_layers}."
    with torch.no_grad():
        for name, t in named_tensors(layer):
            full = prefix + name
            value = load_tensor(ckpt, spec, full, torch.float32 if keep_fp32(full) else dtype)
            t.data = value.to(device)
            t.requires_grad_(False)
    return layer.eval()


@dataclass
class _MTPState:
    hidden: torch.Tensor | None = None  # [capacity, H]: the main model's hidden state per position
    table: BlockTable = field(default_factory=BlockTable)
    done: int = 0  # positions whose MTP keys and values are final


class MTPDrafter:
    """Drafts with the checkpoint's MTP layer; learns the main model's hidden states as the
    engine computes them (``observe``) and keeps the MTP layer's own paged cache per sequence."""

    def __init__(self, layer: MTPLayer, kv: KVCache):
        self.layer, self.kv = layer, kv
        self.states: dict[int, _MTPState] = {}

    @classmethod
    def load(cls, path, spec: ModelSpec, kv_tokens: int, dtype, device, block_size: int = 16) -> MTPDrafter:
        layer = load_mtp(path, spec, dtype, device)
        one_layer = dataclasses.replace(spec, num_layers=1, moe_layers=(0,))
        return cls(layer, KVCache.for_tokens(one_layer, kv_tokens, block_size, dtype, device))

    def observe(self, seq, start: int, hidden: torch.Tensor) -> None:
        """The main model's final hidden states [n, H] of positions start .. start + n - 1."""
        st = self.states.setdefault(seq.id, _MTPState())
        end = start + hidden.shape[0]
        if st.hidden is None or st.hidden.shape[0] < end:
            cap = max(end, 2 * (0 if st.hidden is None else st.hidden.shape[0]), 64)
            grown = hidden.new_empty(cap, hidden.shape[1])
            if st.hidden is not None:
                grown[: st.hidden.shape[0]] = st.hidden
            st.hidden = grown
        st.hidden[start:end] = hidden

    def _run(self, st: _MTPState, start: int, hidden: torch.Tensor, next_ids: list[int]) -> torch.Tensor:
        """MTP at positions start .. start + T - 1 of one sequence -> its outputs [T, H]."""
        dev = hidden.device
        end = start + len(next_ids)
        mgr = self.kv.manager
        mgr.grow(st.table, end)
        batch = AttentionBatch(
            positions=torch.arange(start, end, device=dev),
            slot_mapping=torch.tensor(mgr.slots(st.table, start, end), device=dev),
            block_tables=torch.tensor([st.table.blocks], device=dev, dtype=torch.int32),
            context_lens=torch.tensor([end], device=dev, dtype=torch.int32),
            query_lens=[len(next_ids)],
            context_lens_list=[end],
        )
        ids = torch.tensor(next_ids, device=dev)
        return self.layer.step(hidden.to(self.layer.eh_proj.weight.dtype), ids, batch, self.kv.layers[0])

    @torch.inference_mode()
    def propose(self, seq, k: int) -> list[int]:
        st = self.states.get(seq.id)
        n = seq.num_computed  # positions 0 .. n-1 are final; token n is the newest, not yet computed
        if k <= 0 or st is None or st.hidden is None or n < 1 or st.hidden.shape[0] < n:
            return []
        tokens = seq.token_ids
        if not self.kv.manager.can_grow(st.table, n + k - 1):
            return []  # the MTP cache is full: no drafts for this sequence
        # Catch up on final positions: MTP input i is (h_i, t_{i+1}).
        start = min(st.done, n - 1)
        out = self._run(st, start, st.hidden[start:n], tokens[start + 1 : n + 1])
        st.done = n
        drafts = [int(self.layer.logits(out[-1:])[0].argmax())]
        prev = out[-1:]
        for j in range(1, k):
            # Speculative positions: rolled back below, so the next call starts from final ones.
            prev = self._run(st, n - 1 + j, prev, drafts[-1:])
            drafts.append(int(self.layer.logits(prev)[0].argmax()))
        self.kv.manager.truncate(st.table, n)
        return drafts

    def forget(self, seq_id: int) -> None:
        st = self.states.pop(seq_id, None)
        if st is not None:
            self.kv.manager.release(st.table)
