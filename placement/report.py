"""A plan as a person reads it: what lives where, how much memory, and the predicted speed."""

from __future__ import annotations

from placement.planner import Plan
from placement.units import fmt_bytes

_ORDER = ("attention", "norm", "router", "shared_expert", "dense_mlp", "lm_head", "embed", "routed_expert")


def format_plan(plan: Plan) -> str:
    pr, p = plan.predicted, plan.profile
    lines = [
        f"plan for {plan.model}",
        f"  GPU: {p['gpu']} ({fmt_bytes(p['gpu_hbm_bw'])}/s, {p['gpu_bf16_flops'] / 1e12:.0f} TFLOP/s bf16)"
        + ("  [no GPU here: planned for a pretend card]" if not p["gpus_present"] else ""),
        f"  CPU: {p['cpu_model']}, {p['physical_cores']} cores, {p['numa_nodes']} NUMA node(s), "
        f"{fmt_bytes(p['cpu_read_bw'])}/s read, {fmt_bytes(p['ram_bytes'])} RAM; PCIe {fmt_bytes(p['pcie_pinned_bw'])}/s",
        f"  formats: GPU weights {plan.gpu_weights}"
        + (" (as the checkpoint stores them; lm_head bf16)" if plan.fp8_as_stored else "")
        + f", routed experts {plan.expert_format}"
        + (f" (group {plan.group_size})" if "int4" in (plan.gpu_weights, plan.expert_format) else "")
        + f", KV cache {plan.kv_dtype}",
        "",
    ]
    gpus = plan.options.get("gpus", 1)
    if gpus > 1:
        lines.append(f"  {gpus} GPUs: attention and MLPs split, routed experts dealt out; bytes per GPU")
    lines += _device_table("GPU", plan.gpu_breakdown, plan.gpu_bytes, plan.gpu_budget)
    lines += _device_table("RAM", plan.cpu_breakdown, plan.cpu_bytes, plan.cpu_budget)
    nodes = ", ".join(
        f"node {n}: {fmt_bytes(b)}, {plan.cpu_threads_per_node.get(n, 0)} threads"
        for n, b in plan.cpu_bytes_per_node.items()
    )
    lines.append(f"     routed experts by NUMA node: {nodes}")
    lines += ["", _experts_line(plan), ""]
    lines.append(
        f"KV cache: {fmt_bytes(plan.kv_cache_bytes)} for {plan.kv_tokens} tokens "
        f"({plan.options['context']} context x {plan.options['batch']} sequences, {plan.kv_dtype})"
    )
    lines.append(
        f"predicted decode : {pr['decode_tok_s']:8.2f} tok/s  (batch {plan.options['batch']}, at "
        f"{pr['decode_context']} cached tokens; bound: {pr['decode_bound']})"
    )
    lines.append(
        f"predicted prefill: {pr['prefill_tok_s']:8.1f} tok/s  ({pr['prefill_tokens']}-token prompt; bound: "
        f"{pr['prefill_bound']}; experts streamed to the GPU in {pr['prefill_streamed_layers']} layers, "
        f"on the CPU in {pr['prefill_cpu_layers']})"
    )
    return "\n".join(lines)


def _device_table(dev: str, breakdown: dict[str, int], used: int, budget: int) -> list[str]:
    out = [f"{dev:<4} {'what':<18} {'bytes':>12}"]
    keys = [k for k in _ORDER if k in breakdown] + [k for k in breakdown if k not in _ORDER]
    for k in keys:
        out.append(f"     {k.replace('_', ' '):<18} {fmt_bytes(breakdown[k]):>12}")
    out.append(
        f"     {'total':<18} {fmt_bytes(used):>12}  of {fmt_bytes(budget)} budget ({100 * used / max(budget, 1):.0f}%)"
    )
    return out


def _experts_line(plan: Plan) -> str:
    """Counts per layer, runs of equal counts merged: 'layers 3-40: 6, 41-60: 5'."""
    per = plan.experts_on_gpu
    total = sum(len(v) for v in per.values())
    if not per:
        return "experts on GPU: none (dense model)"
    runs: list[tuple[int, int, int]] = []
    for layer in sorted(per):
        c = len(per[layer])
        if runs and runs[-1][2] == c and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer, c)
        else:
            runs.append((layer, layer, c))
    body = ", ".join(f"{a}-{b}: {c}" if a != b else f"{a}: {c}" for a, b, c in runs)
    line = f"routed experts on GPU: {total} in all; per layer {body}"
    share = plan.predicted.get("gpu_expert_share")
    if share is not None:
        source = "by the expert frequencies" if plan.options.get("freq") else "with uniform routing"
        line += f"\n  they serve {share:.0%} of the routed choices ({source})"
    return line
