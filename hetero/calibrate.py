"""`hetero calibrate`: count which routed experts a model's routers pick on sample text.

Real MoE models route unevenly: in a layer a few experts take many of the tokens. The planner
puts each layer's most used experts on the GPU when it knows how often each is used
(``PlanOptions.freq``); this command measures that on text like the workload's and writes the
counts as ``{"layer": {"expert": count}}``, the file ``hetero plan|bench|serve --freq`` read.
Every forward's router choices are counted (prefill tokens, and decoded tokens with ``--gen``),
through a hook on each MoE layer's router; decode runs without CUDA graphs, whose replays no hook
sees.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from hetero.errors import HeteroError
from hetero.moe import MoE
from hetero.runtime import Runtime, load_runtime
from hetero.sampling import SamplingParams


class ExpertCounts:
    """Counts of each MoE layer's router choices while attached: counts[layer] [num_experts] int64,
    on the model's device, keyed by the layer's index in the model; ``max_tokens``: only forwards of
    at most that many tokens (decode steps), and how many tokens those had (``tokens``)."""

    def __init__(self, model: nn.Module, max_tokens: int | None = None):
        self.counts: dict[int, torch.Tensor] = {}
        self.max_tokens, self.tokens = max_tokens, 0
        self._first = None  # the layer whose forwards count the tokens
        self._hooks = []
        for i, block in enumerate(model.model.layers):
            if not isinstance(block.mlp, MoE):
                continue
            gate = block.mlp.gate
            device = next(gate.parameters()).device
            self.counts[i] = torch.zeros(gate.spec.num_experts, dtype=torch.int64, device=device)
            self._first = i if self._first is None else self._first
            self._hooks.append(gate.register_forward_hook(self._hook(i)))

    def _hook(self, layer: int):
        def count(module: nn.Module, args, out: tuple[torch.Tensor, torch.Tensor]) -> None:
            T = out[0].shape[0]
            if self.max_tokens is not None and T > self.max_tokens:
                return
            self.tokens += T if layer == self._first else 0
            ids = out[0].reshape(-1).long()  # [T * K]
            # scatter_add_, not bincount: no wait for the device (bincount reads the largest id first)
            self.counts[layer].scatter_add_(0, ids, torch.ones_like(ids))

        return count

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def to_json(self) -> dict[str, dict[str, int]]:
        """The counts as ``PlanOptions.freq`` reads them: {"layer": {"expert": count}}."""
        return {str(i): {str(e): int(c) for e, c in enumerate(v.tolist())} for i, v in self.counts.items()}


def ram_shares(model: nn.Module, freq: dict[str, dict[str, int]] | None = None) -> dict[int, float]:
    """Per MoE layer whose experts are split between the GPU and RAM (``HybridExperts``): the share
    of the counted choices that picked a RAM-resident expert (freq None: under uniform routing, the
    share of the layer's experts in RAM)."""
    from hetero.experts import HybridExperts

    out = {}
    for i, block in enumerate(model.model.layers):
        experts = getattr(block.mlp, "experts", None)
        row = None if freq is None else freq.get(str(i))
        if not isinstance(experts, HybridExperts) or (freq is not None and not row):
            continue
        in_ram = experts.cpu_local[: experts.num_experts].cpu() >= 0
        if row is None:
            out[i] = float(in_ram.float().mean())
            continue
        total = sum(row.values())
        out[i] = sum(c for e, c in row.items() if in_ram[int(e)]) / total if total else 0.0
    return out


def count_experts(rt: Runtime, prompts: list[list[int]], gen: int = 0) -> dict[str, dict[str, int]]:
    """Run each prompt (token ids) and ``gen`` tokens after it, greedily, and count the router
    choices of every MoE layer over all their forwards."""
    if rt.engine.graphs is not None:
        raise HeteroError(
            "count_experts needs a runtime without CUDA graphs (RuntimeOptions(cuda_graphs=False))"
        )
    counts = ExpertCounts(rt.engine.model)
    try:
        params = SamplingParams(max_tokens=max(1, gen), temperature=0.0, ignore_eos=True)
        for p in prompts:
            rt.engine.generate([p], params)
    finally:
        counts.detach()
    return counts.to_json()


def text_prompts(token_ids: list[int], chunk: int) -> list[list[int]]:
    """Token ids cut into prompts of at most ``chunk`` tokens (the last may be shorter)."""
    return [token_ids[i : i + chunk] for i in range(0, len(token_ids), chunk)]


def concentration(freq: dict[str, dict[str, int]], share: float = 0.1) -> float:
    """Mean over layers of the share of router choices that the layer's most used ``share`` of
    experts took (``share`` under uniform routing)."""
    out = []
    for row in freq.values():
        c = sorted(row.values(), reverse=True)
        total = sum(c)
        if total:
            out.append(sum(c[: max(1, round(share * len(c)))]) / total)
    return sum(out) / len(out) if out else 0.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="count which routed experts the model uses on sample text (for --freq)",
        description="Run sample text through the model and write how often each layer's router "
        'picked each expert, as JSON {"layer": {"expert": count}}: pass it as --freq to '
        "`hetero plan`, `bench` or `serve` to put the most used experts on the GPU.",
    )
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the demo model)")
    p.add_argument(
        "--text", action="append", default=[], help="a UTF-8 text file of sample input (repeatable)"
    )
    p.add_argument("--prompt", action="append", default=[], help="sample input given inline (repeatable)")
    p.add_argument("--out", required=True, help="where to write the counts (JSON)")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per prompt the text is cut into")
    p.add_argument("--max-tokens", type=int, default=65536, help="count at most this many input tokens")
    p.add_argument("--gen", type=int, default=0, help="also decode this many tokens after each prompt")
    p.add_argument("--device", default="auto")
    p.add_argument("--gpu-mem", default=None, help="device memory to use, e.g. 6GiB (enforced in-process)")
    p.add_argument("--experts", choices=["bf16", "int8", "int4"], default="int4", help="RAM expert format")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hetero.bench import capped_options

    texts = list(args.prompt)
    for f in args.text:
        try:
            texts.append(Path(f).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise HeteroError(f"cannot read the sample text {f}: {e}") from None
    if not any(t.strip() for t in texts):
        raise HeteroError("no sample input: give --text FILE or --prompt TEXT, text like the workload's")
    if args.chunk < 1 or args.max_tokens < 1 or args.gen < 0:
        raise HeteroError("--chunk and --max-tokens must be at least 1, --gen at least 0")
    out = Path(args.out)
    if not out.parent.is_dir():  # before the model loads, not after the counting
        raise HeteroError(
            f"--out {out}: the folder {out.parent} does not exist; create it or write elsewhere"
        )
    opts = capped_options(
        args.gpu_mem,
        device=args.device,
        experts=args.experts,
        max_batch=1,
        max_model_len=args.chunk + max(args.gen, 1) + 8,
        max_step_tokens=args.chunk,
        cuda_graphs=False,  # hooks see no graph replay
        prefix_caching=False,  # every token computed, so every choice counted
    )
    rt = load_runtime(args.model, opts)
    ids: list[int] = []
    for t in texts:
        ids += rt.tokenizer.encode(t)
    ids = ids[: args.max_tokens]
    prompts = text_prompts(ids, args.chunk)
    freq = count_experts(rt, prompts, args.gen)
    out.write_text(json.dumps(freq))
    decoded = len(prompts) * max(args.gen - 1, 0)
    print(
        f"counted {len(ids)} input tokens ({len(prompts)} prompts) and {decoded} decoded ones over "
        f"{len(freq)} MoE layers; the most used 10% of each layer's experts took "
        f"{concentration(freq):.0%} of its choices (10% if routing were uniform); wrote {args.out}"
    )
    return 0
