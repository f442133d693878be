"""Router expert selection: scores, group limiting, top-k, renormalization and scaling in one kernel.

Shapes (T = tokens, E = routed experts, K = experts per token, G = n_group groups of E / G consecutive
experts each):
    logits   [T, E]  float32 (bf16 / fp16 are scored in float32)
    bias     [E]     e_score_correction_bias (noaux_tc only; steers the choice, not the weights)
    ids      [T, K]  int64
    weights  [T, K]  float32

Methods:
    greedy                top-k of the scores.
    group_limited_greedy  (DeepSeek-V2) group score = max score in the group; the experts of all but the
                          topk_group best groups score 0; top-k of those masked scores.
    noaux_tc              (DeepSeek-V3) choice = scores + bias; group score = sum of the group's two best
                          choices; the other groups' choices are -inf; ids = top-k of the choice, weights =
                          the scores at those ids.
Then, with renorm, weights /= (their sum + renorm_eps); finally weights *= scale.

The kernel runs one program per token row and writes each row's experts in descending order of the
choice; the reference keeps torch.topk's order, which is unspecified for the grouped methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import chain_pdl, gdc_launch_dependents, gdc_wait, next_pow2, pdl_launch, tl, triton, use_triton

SCORINGS = ("softmax", "sigmoid")
METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


def _check_logits(logits: torch.Tensor) -> int:
    assert logits.dim() == 2 and logits.is_floating_point(), f"logits {tuple(logits.shape)} {logits.dtype}"
    return logits.shape[1]


def _check_select(E: int, bias, top_k, scoring, method, n_group, topk_group) -> None:
    assert scoring in SCORINGS, f"scoring {scoring!r} not in {SCORINGS}"
    assert method in METHODS, f"method {method!r} not in {METHODS}"
    assert 1 <= top_k <= E, f"top_k={top_k} with {E} experts"
    if bias is not None:
        assert method == "noaux_tc", "only noaux_tc takes a score-correction bias"
        assert bias.shape == (E,) and bias.is_floating_point(), f"bias {tuple(bias.shape)} vs E={E}"
    if method != "greedy":
        assert n_group >= 1 and E % n_group == 0, f"{E} experts do not split into {n_group} groups"
        assert 1 <= topk_group <= n_group, f"topk_group={topk_group}, n_group={n_group}"
    if method == "noaux_tc":
        assert E // n_group >= 2, "noaux_tc scores a group by its two best experts"
        assert top_k <= topk_group * (E // n_group), "top_k exceeds the experts of the kept groups"


def _keep_groups(
    scores: torch.Tensor, group_score: torch.Tensor, topk_group: int, fill: float
) -> torch.Tensor:
    """scores [T, E], group_score [T, G] -> scores with the experts outside the topk_group best groups
    set to `fill`."""
    T, E = scores.shape
    G = group_score.shape[1]
    keep = torch.zeros_like(group_score, dtype=torch.bool)  # [T, G]
    keep.scatter_(1, group_score.topk(topk_group, dim=-1, sorted=False).indices, True)
    keep = keep[:, :, None].expand(-1, -1, E // G).reshape(T, E)  # [T, E]
    return scores.masked_fill(~keep, fill)


def select_experts_reference(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    scoring: str,
    method: str,
    n_group: int = 1,
    topk_group: int = 1,
    renorm: bool = False,
    renorm_eps: float = 0.0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E], bias [E] or None -> (ids [T, K] int64, weights [T, K] float32), in torch."""
    logits = logits.float()
    E = logits.shape[1]
    scores = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)  # [T, E]
    if method == "noaux_tc":
        choice = scores if bias is None else scores + bias  # [T, E]
        grouped = choice.view(-1, n_group, E // n_group)  # [T, G, E/G]
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        choice = _keep_groups(choice, group_score, topk_group, float("-inf"))
        ids = choice.topk(top_k, dim=-1, sorted=False).indices  # [T, K]
        weights = scores.gather(1, ids)
    elif method == "group_limited_greedy":
        group_score = scores.view(-1, n_group, E // n_group).amax(-1)  # [T, G]
        masked = _keep_groups(scores, group_score, topk_group, 0.0)
        weights, ids = masked.topk(top_k, dim=-1, sorted=False)
    else:
        weights, ids = scores.topk(top_k, dim=-1)
    if renorm:
        weights = weights / (weights.sum(-1, keepdim=True) + renorm_eps)
    return ids, weights * scale


@triton.jit
def _select_row(
    x,  # [E_PAD] float32 logits of row t, -inf past E
    t,
    bias_ptr,
    ids_ptr,
    weights_ptr,
    scale,
    renorm_eps,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    SIGMOID: tl.constexpr,
    METHOD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    RENORM: tl.constexpr,
):
    """Score one row's logits, choose its K experts and store ids [K] int64 and weights [K] at row t."""
    e = tl.arange(0, E_PAD)
    valid = e < E
    if SIGMOID:
        scores = tl.where(valid, tl.sigmoid(x), 0.0)
    else:
        p = tl.where(valid, tl.exp(x - tl.max(x, axis=0)), 0.0)
        scores = p / tl.sum(p, axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, float("-inf"))

    if METHOD != 0 and TOPK_GROUP < N_GROUP:
        GS: tl.constexpr = E // N_GROUP
        group = e // GS  # padding lands in groups >= N_GROUP
        expert_group_score = tl.full([E_PAD], float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = group == g
            v = tl.where(in_g, choice, float("-inf"))
            best = tl.max(v, axis=0)
            if METHOD == 2:
                first = tl.min(tl.where(v == best, e, E_PAD), axis=0)
                best += tl.max(tl.where(e == first, float("-inf"), v), axis=0)
            expert_group_score = tl.where(in_g, best, expert_group_score)
        keep = e < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(expert_group_score, axis=0)
            picked = tl.min(tl.where(expert_group_score == best, group, N_GROUP), axis=0)
            keep = keep | (group == picked)
            expert_group_score = tl.where(group == picked, float("-inf"), expert_group_score)
        if METHOD == 2:
            choice = tl.where(keep, choice, float("-inf"))
        else:
            scores = tl.where(keep, scores, 0.0)
            choice = tl.where(valid, scores, float("-inf"))

    k_idx = tl.arange(0, K_PAD)
    ids = tl.zeros([K_PAD], dtype=tl.int32)
    weights = tl.zeros([K_PAD], dtype=tl.float32)
    # One reduction a pick: the choice's bits made order-preserving as signed integers, above the
    # complement of the expert's index (the lower index wins a tie, as in the reference).
    bits = choice.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (bits.to(tl.int64) << 32) | (E_PAD - 1 - e).to(tl.int64)
    for k in tl.static_range(K):
        top = tl.max(key, axis=0)
        pick = E_PAD - 1 - (top & 0xFFFFFFFF).to(tl.int32)
        hit = e == pick
        if HAS_BIAS:  # the weight is the score, not the biased choice
            w = tl.sum(tl.where(hit, scores, 0.0), axis=0)
        else:  # the choice is the score
            b = (top >> 32).to(tl.int32)
            w = tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)
        ids = tl.where(k_idx == k, pick, ids)
        weights = tl.where(k_idx == k, w, weights)
        key = tl.where(hit, -0x7FFFFFFFFFFFFFFF, key)  # below every choice's key, -inf's too
    if RENORM:
        weights = weights / (tl.sum(weights, axis=0) + renorm_eps)
    weights = weights * scale
    k_mask = k_idx < K
    tl.store(ids_ptr + t * K + k_idx, ids.to(tl.int64), mask=k_mask)
    tl.store(weights_ptr + t * K + k_idx, weights, mask=k_mask)


@triton.jit
def _select_experts_kernel(
    logits_ptr,  # [T, E]
    bias_ptr,  # [E] (HAS_BIAS only)
    ids_ptr,  # [T, K] int64
    weights_ptr,  # [T, K] float32
    stride_lt,
    scale,
    renorm_eps,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    SIGMOID: tl.constexpr,
    METHOD: tl.constexpr,  # 0 greedy, 1 group_limited_greedy, 2 noaux_tc
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    RENORM: tl.constexpr,
):
    t = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    x = tl.load(logits_ptr + t * stride_lt + e, mask=e < E, other=float("-inf")).to(tl.float32)
    _select_row(
        x, t, bias_ptr, ids_ptr, weights_ptr, scale, renorm_eps,
        E, E_PAD, K, K_PAD, SIGMOID, METHOD, HAS_BIAS, N_GROUP, TOPK_GROUP, RENORM,
    )  # fmt: skip


@triton.jit
def _route_kernel(
    x_ptr,  # [T, H] hidden states (any float dtype)
    w_ptr,  # [E, H] router weight (any float dtype)
    bias_ptr,  # [E] (HAS_BIAS only)
    logits_ptr,  # [T, E] float32 scratch
    count_ptr,  # [>= T] int32 zeros: programs of row t done (the last one sets it back to 0)
    ids_ptr,  # [T, K] int64
    weights_ptr,  # [T, K] float32
    stride_x,
    scale,
    renorm_eps,
    H,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    SIGMOID: tl.constexpr,
    METHOD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    RENORM: tl.constexpr,
    ROUND: tl.constexpr,  # round each logit to x's dtype first (the product in x's dtype, as Mixtral / Qwen)
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
    USE_PDL: tl.constexpr = 0,  # in the decode chain (chain_pdl): each weight tile loads before the wait
):
    """Program (t, j): logits of experts [j * BLOCK_E, (j + 1) * BLOCK_E) for row t in float32; the
    last of row t's programs to finish scores the row and chooses its experts (_select_row)."""
    if USE_PDL:
        gdc_launch_dependents()
    t = tl.program_id(0)
    j = tl.program_id(1)
    ex = j * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = ex < E
    acc = tl.zeros([BLOCK_E, BLOCK_H], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hmask = h < H
        wv = tl.load(w_ptr + ex[:, None] * H + h[None, :], mask=emask[:, None] & hmask[None, :], other=0.0)
        if USE_PDL:  # x, the counts and the outputs are the kernels before's (a no-op after the first)
            gdc_wait()
        xv = tl.load(x_ptr + t * stride_x + h, mask=hmask, other=0.0).to(tl.float32)
        if ROUND:
            wv = wv.to(x_ptr.dtype.element_ty)
        acc += wv.to(tl.float32) * xv[None, :]
    logit = tl.sum(acc, axis=1)
    if ROUND:
        logit = logit.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(logits_ptr + t * E + ex, logit, mask=emask)
    # Every thread's stores come before this program's count (the barrier), every program's count
    # before the last one reads the row (acquire-release at device scope; the loads skip L1).
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + t, 1, sem="acq_rel", scope="gpu") == tl.num_programs(1) - 1:
        tl.store(count_ptr + t, 0)  # for the next launch
        e = tl.arange(0, E_PAD)
        x = tl.load(logits_ptr + t * E + e, mask=e < E, other=float("-inf"), cache_modifier=".cg")
        _select_row(
            x, t, bias_ptr, ids_ptr, weights_ptr, scale, renorm_eps,
            E, E_PAD, K, K_PAD, SIGMOID, METHOD, HAS_BIAS, N_GROUP, TOPK_GROUP, RENORM,
        )  # fmt: skip


def select_experts_triton(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    scoring: str,
    method: str,
    n_group: int = 1,
    topk_group: int = 1,
    renorm: bool = False,
    renorm_eps: float = 0.0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E], bias [E] or None -> (ids [T, K] int64, weights [T, K] float32), one program a row."""
    _check_select(_check_logits(logits), bias, top_k, scoring, method, n_group, topk_group)
    assert logits.stride(-1) == 1, "logits rows must be contiguous"
    assert bias is None or bias.is_contiguous()
    T, E = logits.shape
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, weights
    rules = _choice_constants(E, bias, top_k, scoring, method, n_group, topk_group, renorm)
    _select_experts_kernel[(T,)](
        logits, bias if bias is not None else logits, ids, weights, logits.stride(0), float(scale),
        float(renorm_eps), **rules, num_warps=1 if rules["E_PAD"] <= 256 else 4,
    )  # fmt: skip
    return ids, weights


def _choice_constants(E, bias, top_k, scoring, method, n_group, topk_group, renorm) -> dict:
    """_select_row's compile-time arguments."""
    grouped = method != "greedy"
    return dict(
        E=E,
        E_PAD=next_pow2(E),
        K=top_k,
        K_PAD=next_pow2(top_k),
        SIGMOID=scoring == "sigmoid",
        METHOD=METHODS.index(method),
        HAS_BIAS=bias is not None,
        N_GROUP=n_group if grouped else 1,
        TOPK_GROUP=topk_group if grouped else 1,
        RENORM=bool(renorm),
    )


def select_experts(
    logits: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    top_k: int,
    scoring: str = "softmax",
    method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    renorm: bool = False,
    renorm_eps: float = 0.0,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top_k experts and their weights.

    logits [T, E] (scored in float32); bias [E] (noaux_tc's e_score_correction_bias) or None;
    scoring "softmax" | "sigmoid"; method "greedy" | "group_limited_greedy" | "noaux_tc" over n_group
    groups of E / n_group consecutive experts, of which the topk_group best stay; renorm divides the
    weights by (their sum + renorm_eps); scale multiplies them last.
    Returns (ids [T, K] int64, weights [T, K] float32).
    """
    kw = dict(
        top_k=top_k,
        scoring=scoring,
        method=method,
        n_group=n_group,
        topk_group=topk_group,
        renorm=renorm,
        renorm_eps=renorm_eps,
        scale=scale,
    )
    if use_triton(logits):
        return select_experts_triton(logits, bias, **kw)
    _check_select(_check_logits(logits), bias, top_k, scoring, method, n_group, topk_group)
    return select_experts_reference(logits, bias, **kw)


# Batches up to this many tokens route in one kernel (route_experts); larger ones (prefill) take a
# GEMM for the logits, then select_experts.
ROUTE_MAX_TOKENS = 256
ROUTE_DEFAULT = {"num_warps": 2}  # an H200 timed 1, 2 and 4 warps: 2 was fastest or tied for every router
_COUNTS: dict[torch.device, torch.Tensor] = {}  # per device: _route_kernel's counters, zero between launches


def router_logits_reference(x: torch.Tensor, weight: torch.Tensor, float_logits: bool) -> torch.Tensor:
    """x [T, H], weight [E, H] -> logits [T, E] float32: products in float32 (float_logits, as DeepSeek's
    reference), else in x's dtype (the weight rounded to it, as Mixtral's and Qwen's)."""
    if float_logits:
        return F.linear(x.float(), weight.float())
    return F.linear(x, weight.to(x.dtype)).float()


def route_experts_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    float_logits: bool,
    top_k: int,
    scoring: str,
    method: str,
    n_group: int = 1,
    topk_group: int = 1,
    renorm: bool = False,
    renorm_eps: float = 0.0,
    scale: float = 1.0,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """route_experts in one kernel (_route_kernel): a row of programs a token computes its logits,
    the last of them to finish chooses the experts. Its counters (_COUNTS, allocated on first use:
    not inside a graph capture) are shared by the device's launches, which must not overlap.
    config: launch settings over ROUTE_DEFAULT (num_warps)."""
    T, H = x.shape
    E = weight.shape[0]
    assert weight.shape == (E, H), f"weight {tuple(weight.shape)} for x {tuple(x.shape)}"
    assert 0 < T <= ROUTE_MAX_TOKENS, f"{T} tokens: route at most {ROUTE_MAX_TOKENS} in one launch"
    _check_select(E, bias, top_k, scoring, method, n_group, topk_group)
    assert x.stride(-1) == 1 and weight.is_contiguous() and (bias is None or bias.is_contiguous())
    counts = _COUNTS.get(x.device)
    if counts is None:
        counts = _COUNTS[x.device] = torch.zeros(ROUTE_MAX_TOKENS, dtype=torch.int32, device=x.device)
    logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    rules = _choice_constants(E, bias, top_k, scoring, method, n_group, topk_group, renorm)
    # One expert a program and (up to 2048) the whole row in one load: every program's reads are in
    # flight at once, where a loop over H would wait on one tile after another.
    pdl = chain_pdl(x.device)
    _route_kernel[(T, E)](
        x, weight, bias if bias is not None else weight, logits, counts, ids, weights,
        x.stride(0), float(scale), float(renorm_eps), H, **rules,
        ROUND=not float_logits, BLOCK_E=1, BLOCK_H=min(2048, next_pow2(H)), USE_PDL=pdl,
        **{**ROUTE_DEFAULT, **(config or {})}, **pdl_launch(pdl),
    )  # fmt: skip
    return ids, weights


def route_experts(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, float_logits: bool, **rules
) -> tuple[torch.Tensor, torch.Tensor]:
    """A router: x [T, H], weight [E, H] -> (ids [T, K] int64, weights [T, K] float32), the logits as
    router_logits_reference computes them, then chosen by ``rules`` (select_experts' keywords) as
    select_experts does. On CUDA with at most ROUTE_MAX_TOKENS tokens, one kernel (route_experts_triton)."""
    one = use_triton(x, weight) and 0 < x.shape[0] <= ROUTE_MAX_TOKENS
    if one and (x.device in _COUNTS or not torch.cuda.is_current_stream_capturing()):
        return route_experts_triton(x, weight, bias, float_logits=float_logits, **rules)
    return select_experts(router_logits_reference(x, weight, float_logits), bias, **rules)
