"""gpu_kernels: torch references and paged-cache bookkeeping on the CPU; Triton kernels vs references on a GPU."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES

import gpu_kernels as gk
from gpu_kernels import kv_write, mla_attention, moe, moe_gemv, paged_attention, quant, router, tuning
from gpu_kernels._triton import HAS_TRITON
from gpu_kernels.mla_attention import mla_decode_attention_triton
from gpu_kernels.paged_attention import paged_decode_attention_triton

# ---------------------------------------------------------------- helpers


def make_block_tables(seq_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator):
    """Disjoint random physical blocks per row: block_tables [N, max_blocks] int32 (unused entries 0)."""
    need = [math.ceil(n / block_size) for n in seq_lens]
    perm = torch.randperm(num_blocks, generator=gen)
    assert sum(need) <= num_blocks
    table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[used : used + n].int()
        used += n
    return table


def dense_attention(q, k, v, scale):
    """q [Hq, D], k [n, Hkv, D], v [n, Hkv, Dv] in float64 -> [Hq, Dv]."""
    g = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("hd,nhd->hn", q, k) * scale
    return torch.einsum("hn,nhd->hd", s.softmax(-1), v)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- CPU: attention references


@pytest.mark.parametrize("block_size", [1, 16])
def test_write_then_paged_decode_matches_dense(block_size):
    gen = torch.Generator().manual_seed(0)
    Hq, Hkv, D, nb = 8, 2, 16, 64
    seq_lens = [1, 17, 40] if block_size == 16 else [1, 5, 9]
    table = make_block_tables(seq_lens, block_size, nb, gen)
    kc = torch.full((nb, block_size, Hkv, D), float("nan"), dtype=torch.float64)
    vc = kc.clone()
    ks, vs = [], []
    for i, n in enumerate(seq_lens):  # write token by token through slot_mapping, as the engine does
        k = torch.randn(n, Hkv, D, generator=gen, dtype=torch.float64)
        v = torch.randn(n, Hkv, D, generator=gen, dtype=torch.float64)
        pos = torch.arange(n)
        slots = table[i].long()[pos // block_size] * block_size + pos % block_size
        slots[0] = -1 if n > 1 else slots[0]  # a skipped slot must leave the cache untouched
        gk.write_kv(k, v, kc, vc, slots)
        if n > 1:
            gk.write_kv(k[:1], v[:1], kc, vc, table[i].long()[:1] * block_size)
        ks.append(k)
        vs.append(v)
    q = torch.randn(len(seq_lens), Hq, D, generator=gen, dtype=torch.float64)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = gk.paged_decode_attention(q, kc, vc, table, lens, 0.3)
    for i in range(len(seq_lens)):
        torch.testing.assert_close(out[i], dense_attention(q[i], ks[i], vs[i], 0.3), rtol=1e-10, atol=1e-10)


def test_staggered_rows_share_one_block_table():
    """Speculative verification: rows over one sequence with seq_lens n-2, n-1, n see growing prefixes."""
    gen = torch.Generator().manual_seed(1)
    kc = torch.randn(8, 4, 2, 8, generator=gen, dtype=torch.float64)
    vc = torch.randn(8, 4, 2, 8, generator=gen, dtype=torch.float64)
    table = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32).repeat(3, 1)
    lens = torch.tensor([9, 10, 11], dtype=torch.int32)
    q = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)
    out = gk.paged_decode_attention(q, kc, vc, table, lens, 0.5)
    for i, n in enumerate(lens.tolist()):
        k = paged_attention.gather_kv(kc, table[0], n)
        v = paged_attention.gather_kv(vc, table[0], n)
        torch.testing.assert_close(out[i], dense_attention(q[i], k, v, 0.5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_cache_round_trip_and_decode(cache_dtype):
    gen = torch.Generator().manual_seed(2)
    nb, bs, Hkv, D = 6, 4, 2, 32
    k = torch.randn(20, Hkv, D, generator=gen)
    v = torch.randn(20, Hkv, D, generator=gen)
    kc = torch.zeros(nb, bs, Hkv, D, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    ksc = torch.zeros(nb, bs, Hkv)
    vsc = torch.zeros(nb, bs, Hkv)
    table = torch.tensor([[3, 0, 5, 1, 4]], dtype=torch.int32)
    pos = torch.arange(20)
    slots = table[0].long()[pos // bs] * bs + pos % bs
    gk.write_kv(k, v, kc, vc, slots, ksc, vsc)
    k_back = paged_attention.gather_kv(kc, table[0], 20, ksc)  # [20, Hkv, D]
    amax = k.abs().amax(-1, keepdim=True)
    if cache_dtype == torch.int8:  # half a quantization step
        assert ((k_back - k).abs() <= amax / 127 * 0.5 + 1e-6).all()
    else:  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 above the subnormal range
        assert ((k_back - k).abs() <= k.abs() / 16 + amax / 448 * 2**-6 + 1e-6).all()
    q = torch.randn(1, 4, D, generator=gen).bfloat16()
    out = gk.paged_decode_attention(q, kc, vc, table, torch.tensor([20], dtype=torch.int32), 0.2, ksc, vsc)
    v_back = paged_attention.gather_kv(vc, table[0], 20, vsc)
    ref = dense_attention(q[0].double(), k_back.double(), v_back.double(), 0.2)
    torch.testing.assert_close(out[0].double(), ref, rtol=2e-2, atol=2e-2)


def test_mla_reference_matches_expanded_attention():
    """Absorbed MLA equals attention with keys [c_kv, k_pe] and values c_kv."""
    gen = torch.Generator().manual_seed(3)
    nb, bs, H, R, P = 10, 8, 4, 32, 8
    cache = torch.randn(nb, bs, R + P, generator=gen, dtype=torch.float64)
    seq_lens = [13, 1]
    table = make_block_tables(seq_lens, bs, nb, gen)
    ql = torch.randn(2, H, R, generator=gen, dtype=torch.float64)
    qp = torch.randn(2, H, P, generator=gen, dtype=torch.float64)
    out = gk.mla_decode_attention(ql, qp, cache, table, torch.tensor(seq_lens, dtype=torch.int32), 0.1)
    for i, n in enumerate(seq_lens):
        c = paged_attention.gather_kv(cache, table[i], n)  # [n, R + P]
        q = torch.cat([ql[i], qp[i]], -1)  # [H, R + P]
        ref = dense_attention(q, c[:, None, :], c[:, None, :R], 0.1)
        torch.testing.assert_close(out[i], ref, rtol=1e-10, atol=1e-10)


def test_write_latent_round_trip():
    cache = torch.zeros(4, 4, 12)
    lat = torch.randn(3, 12)
    gk.write_latent(lat, cache, torch.tensor([5, -1, 14]))
    flat = cache.view(-1, 12)
    assert torch.equal(flat[5], lat[0]) and torch.equal(flat[14], lat[2])
    assert (flat.abs().sum(-1) > 0).sum() == 2


def test_prefill_and_paged_prefill_match_dense():
    gen = torch.Generator().manual_seed(4)
    T, ctx, Hq, Hkv, D, bs = 5, 13, 4, 2, 8, 4
    q = torch.randn(T, Hq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(ctx, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(ctx, Hkv, D, generator=gen, dtype=torch.float64)
    ref = torch.stack(
        [dense_attention(q[i], k[: ctx - T + i + 1], v[: ctx - T + i + 1], 0.4) for i in range(T)]
    )
    out = gk.prefill_attention(q, k[-T:], v[-T:], 0.4)
    ref_self = torch.stack(
        [
            dense_attention(q[i], k[ctx - T : ctx - T + i + 1], v[ctx - T : ctx - T + i + 1], 0.4)
            for i in range(T)
        ]
    )
    torch.testing.assert_close(out, ref_self)
    table = torch.tensor([2, 0, 3, 1], dtype=torch.int32)
    kc = torch.zeros(4, bs, Hkv, D, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    pos = torch.arange(ctx)
    gk.write_kv(k, v, kc, vc, table.long()[pos // bs] * bs + pos % bs)
    torch.testing.assert_close(gk.paged_prefill_attention(q, kc, vc, table, ctx, 0.4), ref)


# ---------------------------------------------------------------- CPU: quantized weights


@pytest.mark.parametrize(
    "fmt,group", [("bf16", 128), ("fp8", 128), ("int8", 128), ("int4", 32), ("int4", 128)]
)
def test_quantize_round_trip(fmt, group):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(3, 24, 256, generator=gen)  # stacked experts
    qw = gk.quantize_weight(w, fmt, group)
    back = gk.dequantize_weight(qw, torch.float32)
    assert back.shape == w.shape
    if fmt == "bf16":
        bound = w.abs() * 2**-8
    elif fmt == "fp8":
        bound = w.abs() / 16 + qw.scales[..., None] * 2**-6
    elif fmt == "int8":
        bound = qw.scales[..., None] * 0.5
    else:
        bound = qw.scales.repeat_interleave(group, -1) * 0.5
    assert ((back - w).abs() <= bound * 1.001 + 1e-6).all()
    again = gk.quantize_weight(back, fmt, group)  # quantized values are a fixed point
    torch.testing.assert_close(gk.dequantize_weight(again, torch.float32), back, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "fp8"])
def test_quant_linear_module_matches_linear(fmt):
    gen = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(128, 40)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 128, generator=gen) * 0.1)
    ql = gk.QuantLinear.from_linear(lin, fmt, group_size=64)
    x = torch.randn(2, 3, 128, generator=gen)
    ref = F.linear(x, gk.dequantize_weight(ql.qweight, torch.float32), lin.bias)
    torch.testing.assert_close(ql(x), ref, rtol=1e-5, atol=1e-5)
    assert rel_err(ql(x), lin(x)) < {"bf16": 1e-2, "fp8": 6e-2, "int8": 1e-2, "int4": 0.15}[fmt]


def test_quant_weight_rejects_bad_format():
    with pytest.raises(ValueError):
        gk.quantize_weight(torch.randn(4, 8), "int3")
    with pytest.raises(ValueError):
        gk.quantize_weight(torch.randn(4, 96), "int4", group_size=64)


# ---------------------------------------------------------------- CPU: MoE


@pytest.mark.parametrize("T,K,E,bs", [(1, 2, 4, 16), (7, 3, 5, 4), (33, 6, 8, 16), (4, 2, 64, 16)])
def test_moe_align_block_size_invariants(T, K, E, bs):
    gen = torch.Generator().manual_seed(T * 100 + E)
    ids = torch.randint(-1, E, (T, K), generator=gen, dtype=torch.int32)
    sorted_ids, expert_ids, npad = gk.moe_align_block_size(ids, bs, E)
    n = int(npad)
    assert n % bs == 0 and sorted_ids.numel() % bs == 0 and expert_ids.numel() == sorted_ids.numel() // bs
    flat = ids.reshape(-1)
    real = sorted_ids[:n][sorted_ids[:n] < T * K].long()
    assert sorted(real.tolist()) == [i for i in range(T * K) if flat[i] >= 0]  # every kept slot once
    assert (sorted_ids[n:] == T * K).all()
    for b in range(sorted_ids.numel() // bs):
        rows = sorted_ids[b * bs : (b + 1) * bs].long()
        if b * bs >= n:
            assert expert_ids[b] == -1
            continue
        rows = rows[rows < T * K]
        assert (
            rows.numel() > 0 and (flat[rows] == expert_ids[b]).all()
        )  # one expert per block, no empty block
    counts = torch.bincount(flat[flat >= 0].long(), minlength=E)
    assert n == int(((counts + bs - 1) // bs * bs).sum())


def check_align_kernel() -> None:
    """Run with TRITON_INTERPRET=1: the align kernels give the torch version's exact arrays, slots
    not routed here (-1) and programs with no slots of an expert included."""
    gen = torch.Generator().manual_seed(3)
    for T, K, E, bs in ((1, 2, 4, 16), (7, 3, 5, 4), (70, 6, 8, 16), (45, 8, 64, 16), (300, 2, 3, 64)):
        ids = torch.randint(-1, E, (T, K), generator=gen, dtype=torch.int32)
        want = gk.moe_align_block_size(ids, bs, E, kernel=False)
        got = gk.moe_align_block_size(ids, bs, E, kernel=True)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (T, K, E, bs, a, b)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
def test_moe_align_kernel_in_interpreter():
    in_interpreter("check_align_kernel()")


def moe_per_expert_loop(x, w13, w2, ids, weights):
    """Mixtral-style loop over experts in float64; w13 [E, 2I, H], w2 [E, H, I] dense."""
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for e in range(w13.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = x[tok] @ w13[e].T
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        out.index_add_(0, tok, (h @ w2[e].T) * weights[tok, slot, None])
    return out


@pytest.mark.parametrize("T,K,E", [(1, 2, 4), (9, 3, 6), (40, 6, 8)])
@pytest.mark.parametrize("fmt", ["dense", "int8", "int4"])
def test_fused_moe_reference_matches_loop(T, K, E, fmt):
    gen = torch.Generator().manual_seed(T + 10 * E)
    H, inter = 64, 32
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    w13 = torch.randn(E, 2 * inter, H, generator=gen, dtype=torch.float64) * 0.2
    w2 = torch.randn(E, H, inter, generator=gen, dtype=torch.float64) * 0.2
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int()
    ids[0, -1] = -1
    weights = torch.rand(T, K, generator=gen)
    if fmt == "dense":
        out = gk.fused_moe(x, w13, w2, ids, weights)
        ref = moe_per_expert_loop(x, w13, w2, ids, weights.double())
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    else:
        q13, q2 = gk.quantize_weight(w13, fmt, 32), gk.quantize_weight(w2, fmt, 32)
        out = gk.fused_moe(x, q13, q2, ids, weights)
        d13, d2 = gk.dequantize_weight(q13, torch.float64), gk.dequantize_weight(q2, torch.float64)
        torch.testing.assert_close(
            out, moe_per_expert_loop(x, d13, d2, ids, weights.double()), rtol=1e-6, atol=1e-6
        )


def test_tuned_config_lookup(tmp_path, monkeypatch):
    (tmp_path / "k.json").write_text('{"dev": {"E=8": {"1": {"BLOCK_N": 32}, "64": {"BLOCK_N": 128}}}}')
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    tuning._load.cache_clear()
    assert tuning.get_config("k", "E=8", 2, {"BLOCK_N": 64, "w": 4}, device="dev") == {"BLOCK_N": 32, "w": 4}
    assert tuning.get_config("k", "E=8", 50, {"BLOCK_N": 64}, device="dev")["BLOCK_N"] == 128
    # nearest by ratio: 12 is nearer 64 (x5.3) than 1 (x12), though 11 from 1 and 52 from 64
    assert tuning.get_config("k", "E=8", 12, {"BLOCK_N": 64}, device="dev")["BLOCK_N"] == 128
    # Another number of experts takes the nearest E's entry; another shape falls back to the defaults.
    assert tuning.get_config("k", "E=9", 50, {"BLOCK_N": 64}, device="dev")["BLOCK_N"] == 128
    assert tuning.get_config("k", "N=9", 50, {"BLOCK_N": 64}, device="dev")["BLOCK_N"] == 64
    tuning._load.cache_clear()


def test_tuned_configs_of_the_same_architecture(tmp_path, monkeypatch):
    """A shape a device has no entry for takes a device's of its compute capability, none of another's."""
    (tmp_path / "k.json").write_text(
        '{"_arch": {"big": "9.0", "old": "8.0"}, "old": {"E=8": {"1": {"BLOCK_N": 16}}},'
        ' "big": {"E=8": {"1": {"BLOCK_N": 32}}}}'
    )
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(tuning, "device_arch", {"bigger": "9.0", "big": "9.0", "odd": "7.5"}.get)
    tuning._load.cache_clear()
    try:
        assert tuning.get_config("k", "E=8", 1, {"BLOCK_N": 64}, device="bigger")["BLOCK_N"] == 32
        assert tuning.get_config("k", "E=8", 1, {"BLOCK_N": 64}, device="odd")["BLOCK_N"] == 64
        assert tuning.get_config("k", "E=8", 1, {"BLOCK_N": 64}, device="unknown")["BLOCK_N"] == 64
        tuning.save_configs("k", {"bigger": {"N=4": {1: {"BLOCK_N": 8}}}}, {"bigger": "9.0"})
        assert tuning.get_config("k", "N=4", 1, {"BLOCK_N": 64}, device="bigger")["BLOCK_N"] == 8  # its own
        assert tuning.get_config("k", "E=8", 1, {"BLOCK_N": 64}, device="bigger")["BLOCK_N"] == 32  # borrowed
        assert tuning._load("k")[tuning.ARCH] == {"big": "9.0", "old": "8.0", "bigger": "9.0"}
    finally:
        tuning._load.cache_clear()


def test_shipped_configs_parse():
    for path in tuning.CONFIG_DIR.glob("*.json"):
        stored = tuning._load(path.stem)
        assert set(stored[tuning.ARCH]) == set(stored) - {tuning.ARCH}  # every device's capability known
        for device, shapes in stored.items():
            if device == tuning.ARCH:
                continue
            for by_batch in shapes.values():
                assert all(int(b) > 0 and "BLOCK_N" in cfg for b, cfg in by_batch.items())


# ---------------------------------------------------------------- CPU: MoE GEMV kernels in the Triton interpreter

GEMV_CASES = [("bf16", 128), ("int8", 128), ("int4", 32), ("int4", 64), ("int4", 128), ("fp8", 128)]


def moe_weights(E: int, H: int, inter: int, fmt: str, group: int, gen: torch.Generator, device="cpu"):
    """w13 [E, 2I, H], w2 [E, H, I] quantized; scaled so that a layer's outputs stay O(1) at any size."""
    w13 = torch.randn(E, 2 * inter, H, generator=gen, device=device) * H**-0.5
    w2 = torch.randn(E, H, inter, generator=gen, device=device) * inter**-0.5
    return gk.quantize_weight(w13, fmt, group), gk.quantize_weight(w2, fmt, group)


def gemv_moe_inputs(T: int, K: int, fmt: str, group: int, dtype: torch.dtype, gen: torch.Generator):
    """Small odd sizes (I, H not multiples of BLOCK_N), ids with repeats and -1, and an unsplit config with
    the keys configs stored before split-K had (int4: BLOCK_K under the group, rounded up to it)."""
    E = 4
    if fmt == "int4":  # int4 needs H, I multiples of the group; BLOCK_N = 2 * group leaves a partial block
        H, inter, bn = 5 * group, 3 * group, 2 * group
    else:
        H, inter, bn = 200, 72, 64
    x = torch.randn(T, H, generator=gen).to(dtype)
    w13, w2 = moe_weights(E, H, inter, fmt, group, gen)
    ids = torch.randint(0, E, (T, K), generator=gen, dtype=torch.int32).view(-1)
    if ids.numel() > 1:
        ids[1] = -1
    if ids.numel() > 2:
        ids[-1] = ids[0]  # one expert twice
    weights = torch.rand(T, K, generator=gen) + 0.1
    cfg = {"BLOCK_N": bn, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    return x, w13, w2, ids.view(T, K), weights, cfg


def gemv_split_configs(fmt: str, group: int) -> list[dict]:
    """Split-K GEMV configs for gemv_moe_inputs' sizes whose last split is partial (H, I are not multiples
    of SPLIT_K * BLOCK_K), some of whose splits span several tiles and (int4) tiles several groups."""
    if fmt == "int4":  # H = 5 groups, I = 3
        return [  # H: 2 splits of 2 tiles of 2 groups, the last 1 group; I: 2 splits, the last 1 group
            {"BLOCK_N": 2 * group, "BLOCK_K": 2 * group, "SPLIT_K": 2, "SPLIT_K2": 2},
            # H: 2 splits of 1 tile of 4 groups, the last 1 group; I: 1 tile of 4 groups, 3 real; down's
            # own tile: 4 groups of rows (2 row blocks over H, the last partial)
            {"BLOCK_N": group, "BLOCK_K": 4 * group, "SPLIT_K": 3, "SPLIT_K2": 4, "BLOCK_N2": 4 * group},
        ]
    return [  # H = 200: 3 splits of 3 tiles, the last 8 columns; I = 72: 2 splits of 2 tiles, the last 8
        {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 3, "SPLIT_K2": 2},
        # H: 4 splits of 1 tile; I: unsplit; down: its own 128-row tiles and warps (2 over H, one partial)
        {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 4, "SPLIT_K2": 1, "BLOCK_N2": 128, "num_warps2": 2},
    ]


def check_moe_gemv(fmt: str, group: int) -> None:
    """Run with TRITON_INTERPRET=1: the GEMV kernels on CPU tensors vs fused_moe_reference."""
    gen = torch.Generator().manual_seed(group + len(fmt))
    cases = [(1, K, torch.bfloat16) for K in (1, 2, 6)] + [(3, 2, torch.bfloat16), (3, 2, torch.float32)]
    one, many, f32 = cases[2], cases[3], cases[4]  # one token of six experts; three of two; float32 x
    split0, split1 = gemv_split_configs(fmt, group)
    # every case unsplit; each split config on one token and on three (the interpreter runs small tiles
    # slowly, so not every case over every config)
    runs = [(case, None) for case in cases] + [(one, split0), (many, split0), (one, split1), (f32, split1)]
    # int4 / int8: the float path, and integer dot products on int8-rounded activations (DP4A) for one
    # token of six experts, unsplit and over the second split config (the interpreter runs dp4a slowly)
    variants = ({"DP4A": 0}, {"DP4A": 1}) if fmt in ("int4", "int8") else ({},)
    runs = [
        (run, v)
        for run, v in itertools.product(runs, variants)
        if not v.get("DP4A") or run in ((one, None), (one, split1))
    ]
    for ((T, K, dtype), split), variant in runs:
        x, w13, w2, ids, weights, cfg = gemv_moe_inputs(T, K, fmt, group, dtype, gen)
        cfg = {**cfg, **variant, **(split or {})}
        out = moe_gemv.fused_moe_gemv(x, w13, w2, ids, weights, cfg)
        ref = moe.fused_moe_reference(x.float(), w13, w2, ids, weights)
        assert out.dtype == dtype and out.shape == ref.shape
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # float32 x: the sums' order is the only difference
        print(f"T={T} K={K} {dtype} {split} {variant}: max error {(out.float() - ref).abs().max():.2e}")
        if cfg.get("DP4A"):  # rounding the activations to int8 per group moves the output ~1.5%
            assert 1e-3 < rel_err(out, ref) < 3e-2
            cfg_float = {**cfg, "DP4A": 0}  # and differently from the float path: the variant ran
            assert not torch.equal(out, moe_gemv.fused_moe_gemv(x, w13, w2, ids, weights, cfg_float))
        else:
            torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
            assert rel_err(out, ref) < tol / 2
        if split is not None and T == 1 and not cfg.get("DP4A"):  # no atomics: a second call, the same bits
            assert torch.equal(moe_gemv.fused_moe_gemv(x, w13, w2, ids, weights, cfg), out)
    # default config through the dispatcher (T*K small picks GEMV); every slot skipped gives exact zeros
    x, w13, w2, ids, weights, cfg = gemv_moe_inputs(1, 2, fmt, group, torch.bfloat16, gen)
    out = moe.fused_moe_triton(x, w13, w2, ids, weights)
    assert rel_err(out, moe.fused_moe_reference(x.float(), w13, w2, ids, weights)) < 3e-2
    for config in (None, {**cfg, **split0}):
        out = moe_gemv.fused_moe_gemv(x, w13, w2, torch.full_like(ids, -1), weights, config)
        assert torch.equal(out, torch.zeros_like(out))


def check_moe_chunks(fmt: str, group: int) -> None:
    """Run with TRITON_INTERPRET=1: the sorted path routed once and run over chunks of the experts
    (as streamed prefill runs it) against fused_moe_reference, and as one call."""
    gen = torch.Generator().manual_seed(7 + group)
    x, w13, w2, ids, weights, cfg = gemv_moe_inputs(9, 3, fmt, group, torch.float32, gen)
    cfg = {**cfg, "BLOCK_M": 16}
    ref = moe.fused_moe_reference(x, w13, w2, ids, weights)
    whole = moe.fused_moe_triton(x, w13, w2, ids, weights, cfg)
    routing = moe.moe_route(x, ids, weights, 4, w13.shape[1] // 2, fmt, group, cfg)
    for lo, hi in ((0, 1), (1, 3), (3, 4)):  # experts 0 | 1, 2 | 3, each chunk's weights alone
        part13 = gk.QuantWeight(
            fmt, w13.data[lo:hi], _rows(w13.scales, lo, hi), group, (hi - lo, *w13.shape[1:])
        )
        part2 = gk.QuantWeight(fmt, w2.data[lo:hi], _rows(w2.scales, lo, hi), group, (hi - lo, *w2.shape[1:]))
        moe.fused_moe_chunk(routing, x, part13, part2, lo)
    chunked = moe.moe_finish(routing)
    for out in (whole, chunked):
        print(f"max error {(out - ref).abs().max():.2e}")
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def packed_moe_inputs(T: int, K: int, fmt: str, group: int, seed: int = 0):
    """Experts packed by the CPU kernels (cpu_kernels.pack_experts), their exact MoE in float64, and the
    torch views fused_moe_packed reads. H and I are not multiples of 128 (the layout pads them)."""
    import cpu_kernels
    from hetero.experts import torch_moe
    from hetero.packed import dequantize_packed

    gen = torch.Generator().manual_seed(seed)
    E, H, inter = 5, 320, 200
    w = [torch.randn(E, *shape, generator=gen) * 0.1 for shape in ((inter, H), (inter, H), (H, inter))]
    p = cpu_kernels.pack_experts(*(a.numpy() for a in w), fmt=fmt, group_size=group)
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).int()
    ids[0, 0] = -1  # a slot another backend handles
    weights = torch.rand(T, K, generator=gen)
    dense = dequantize_packed(p, list(range(E)), torch.float64)
    scale = torch.float16 if fmt == "int4" else torch.float32
    views = [torch.from_numpy(p.gate_up), torch.from_numpy(p.down)]
    views += [torch.from_numpy(a).view(scale) for a in (p.gate_up_scale, p.down_scale)]
    return x, ids, weights, views, lambda x, ids, w: torch_moe(x.double(), ids.long(), w.double(), *dense)


def check_moe_packed(fmt: str, group: int) -> None:
    """Run with TRITON_INTERPRET=1: the GEMV kernels over the CPU kernels' packed layout, default and
    unsplit launch settings, against the packed weights' exact MoE."""
    x, ids, weights, views, moe_of = packed_moe_inputs(3, 2, fmt, group)
    ref = moe_of(x, ids, weights)
    # 32 rows a program: I = 200 leaves a partial block (the interpreter runs many small programs slowly)
    unsplit = {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1, "SPLIT_K2": 1, "num_warps": 2}
    for cfg in (None, unsplit):
        out = moe_gemv.fused_moe_packed(x, fmt, *views, group, ids, weights, cfg)
        print(f"max error {(out.double() - ref).abs().max():.2e}")
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def check_gather_rows() -> None:
    """Run with TRITON_INTERPRET=1: one launch gathers the chosen rows of one array, then of three
    arrays of different widths (ragged last blocks), and leaves the slots of -1 as they were."""
    from gpu_kernels import gather

    gen = torch.Generator().manual_seed(5)
    sel = torch.tensor([4, -1, 0, 5], dtype=torch.int32)
    widths = (3 * gather.GATHER_BLOCK + 5, 7, gather.GATHER_BLOCK)
    srcs = [torch.randint(-(2**31), 2**31 - 1, (6, w), generator=gen, dtype=torch.int32) for w in widths]
    for n in (1, 3):
        dsts = [torch.zeros(4, w, dtype=torch.int32) for w in widths[:n]]
        gather.gather_rows(srcs[:n] if n > 1 else srcs[0], sel, dsts if n > 1 else dsts[0])
        for src, dst in zip(srcs, dsts):
            assert torch.equal(dst[[0, 2, 3]], src[[4, 0, 5]]) and not dst[1].any()
            assert torch.equal(gather.gather_rows_reference(src, sel, torch.zeros_like(dst)), dst)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
def test_gather_rows_in_interpreter():
    in_interpreter("check_gather_rows()")


def _rows(scales, lo: int, hi: int):
    return None if scales is None else scales[lo:hi]


def interpreter_index_fix() -> None:
    """Triton 3.6's interpreter turns a scalar (a one-element array there) into a loop bound by int() on
    the array, which numpy >= 2.4 refuses for arrays of one dimension: take the element instead (the
    fix Triton's later interpreter has)."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def in_interpreter(call: str, module: str = "test_gpu_kernels") -> None:
    """Run `<module>.<call>` (a test module here) in a child process under TRITON_INTERPRET=1: the flag
    is read when @triton.jit decorates, so the kernels must be imported afresh."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    code = f"import test_gpu_kernels as g, {module} as t; g.interpreter_index_fix(); t.{call}"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
@pytest.mark.parametrize("fmt,group", [("bf16", 128), ("int8", 128), ("int4", 32)])
def test_moe_sorted_kernels_over_expert_chunks_in_interpreter(fmt, group):
    in_interpreter(f"check_moe_chunks({fmt!r}, {group})")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
@pytest.mark.parametrize("fmt,group", GEMV_CASES)
def test_moe_gemv_kernels_in_interpreter(fmt, group):
    in_interpreter(f"check_moe_gemv({fmt!r}, {group})")


def make_qweight(w: torch.Tensor, fmt: str, group: int) -> quant.QuantWeight:
    """quantize_weight, or ("fp8-blocks") an FP8 checkpoint's weight: e4m3 with a scale per group x group
    block, as hetero make-model writes it."""
    if fmt != "fp8-blocks":
        return gk.quantize_weight(w, fmt, group)
    from hetero.make_model import quantize_fp8

    q, scale_inv = quantize_fp8(w.float().cpu().clone(), group)
    return gk.fp8_blocks(q.to(w.device), scale_inv, group)


def test_fused_moe_kernels_refuse_block_scaled_fp8():
    """The fused-MoE kernels read fp8 experts with one scale a row: block-scaled ones (an FP8
    checkpoint's layout) are refused on both paths, before any launch, with the fix named."""
    gen = torch.Generator().manual_seed(5)
    E, inter, H, g = 2, 128, 256, 128

    def blocked(n: int, k: int) -> quant.QuantWeight:
        data = torch.randn(E, n, k, generator=gen).to(torch.float8_e4m3fn)
        return quant.QuantWeight("fp8", data, torch.rand(E, n // g, k // g, generator=gen), g, (E, n, k))

    w13, w2 = blocked(2 * inter, H), blocked(H, inter)
    x = torch.randn(3, H, generator=gen)
    ids = torch.randint(0, E, (3, 2), generator=gen, dtype=torch.int32)
    wts = torch.rand(3, 2, generator=gen)
    for config in (None, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}):
        with pytest.raises(ValueError, match="one scale per row"):
            moe.fused_moe_triton(x, w13, w2, ids, wts, config)
    routing = moe.MoERouting.__new__(moe.MoERouting)
    with pytest.raises(ValueError, match="block-scaled"):
        moe.fused_moe_chunk(routing, x, w13, w2, 0)


def test_fp8_blocks_hold_the_checkpoint_exactly():
    """A block-scaled fp8 weight dequantizes to what the checkpoint reader makes of the same bytes
    (rows and columns not multiples of the block); per-row re-quantization of those values does not."""
    from hetero.checkpoint import dequantize_fp8_blocks

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(72, 200, generator=gen) * 0.05
    qw = make_qweight(w, "fp8-blocks", 64)
    assert qw.blocked and qw.fmt_id == quant.FP8_BLOCKS and qw.scales.shape == (2, 4)
    want = dequantize_fp8_blocks(qw.data, qw.scales, 64)
    assert torch.equal(gk.dequantize_weight(qw, torch.float32), want.float())
    again = gk.quantize_weight(want, "fp8")  # per row: a second rounding
    assert rel_err(gk.dequantize_weight(again, torch.float32), want) > 1e-3
    assert qw.nbytes() == 72 * 200 + 4 * 2 * 4
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        gk.fp8_blocks(w, qw.scales, 64)


def check_linear_gemv(fmt: str, group: int) -> None:
    """Run with TRITON_INTERPRET=1: quant_linear's GEMV path on CPU tensors vs the dequantized weight,
    N not a multiple of BLOCK_N, K split into partial tiles, with and without a bias, each DP4A way;
    fmt "fp8-blocks" (a checkpoint's block-scaled fp8) also through the tl.dot path."""
    from gpu_kernels import linear_gemv

    gen = torch.Generator().manual_seed(group + len(fmt))
    N, K = 72, 384
    qw = make_qweight(torch.randn(N, K, generator=gen) * 0.05, fmt, group)
    fmt = qw.fmt
    w = gk.dequantize_weight(qw, torch.float64)
    tiles = [
        {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2},  # 3 tiles: splits of 2 and 1
        {"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 1},  # unsplit, the last tile partial
        {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 16, "ROWS": 2},  # int4 g128: whole groups; 3 rows as 2 + 1
    ]
    variants = ({"DP4A": 0}, {"DP4A": 1}) if fmt in ("int4", "int8") else ({},)
    # a bias on three rows, none on one (every tile and DP4A way both ways would double the interpreter's time)
    for M, tile, variant in itertools.product((1, 3), tiles, variants):
        cfg, with_bias = {**tile, **variant, "num_warps": 4}, M == 3
        x = torch.randn(M, K, generator=gen)
        b = torch.randn(N, generator=gen) if with_bias else None
        out = quant.quant_linear_triton(x, qw, b, cfg)
        ref = x.double() @ w.T + (0 if b is None else b.double())
        print(f"M={M} {cfg} bias={with_bias}: error {rel_err(out, ref):.2e}")
        assert out.shape == (M, N) and out.dtype == x.dtype
        if cfg.get("DP4A"):  # activations rounded to int8 per 128 columns or group
            assert 1e-4 < rel_err(out, ref) < 3e-2
        else:
            torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
        if M == 1 and cfg["SPLIT_K"] > 1:  # no atomics: a second call, the same bits
            assert torch.equal(linear_gemv.linear_gemv(x, qw, b, cfg), out)
        if cfg["SPLIT_K"] > 1:  # the partial sums left for a kernel after it: the same sum
            part = linear_gemv.linear_gemv(x, qw, b, cfg, summed=False)
            assert part.dtype == torch.float32 and part.shape[1:] == (M, N) and part.shape[0] > 1
            torch.testing.assert_close(part.sum(0), out, rtol=1e-5, atol=1e-5)
    # the tl.dot kernel over the whole K and over splits of whole tiles (the bias added once); int4
    # tiles within one group
    x, b = torch.randn(5, K, generator=gen), torch.randn(N, generator=gen)
    for split in (1, 3):
        cfg = {**quant._DEFAULT, "BLOCK_N": 32, "BLOCK_K": min(64, group), "SPLIT_K": split}
        out = quant.quant_linear_triton(x, qw, b, cfg)
        torch.testing.assert_close(out.double(), x.double() @ w.T + b.double(), rtol=1e-4, atol=1e-4)
    x = torch.randn(2, 3, K, generator=gen).bfloat16()  # leading dims; the default config takes this path
    assert "BLOCK_M" not in quant.quant_linear_config(3, N, K, fmt, group)  # no tuned entry on the CPU
    assert "BLOCK_M" in quant.quant_linear_config(linear_gemv.GEMV_MAX_ROWS + 1, N, K, fmt, group)
    out = quant.quant_linear_triton(x[:1], qw)
    assert out.shape == (1, 3, N) and rel_err(out, x[:1].double() @ w.T) < 3e-2
    if qw.blocked:  # tl.dot tiles: one block of scales a tile, however wide the config asks
        x = torch.randn(8, K, generator=gen)
        for cfg in ({**quant._DEFAULT, "BLOCK_K": 256}, quant.quant_linear_config(8, N, K, fmt, group, True)):
            out = quant.quant_linear_triton(x, qw, None, cfg)
            torch.testing.assert_close(out.double(), x.double() @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
@pytest.mark.parametrize(
    "fmt,group", [("int8", 128), ("int4", 32), ("int4", 128), ("fp8", 128), ("fp8-blocks", 64)]
)
def test_linear_gemv_in_interpreter(fmt, group):
    in_interpreter(f"check_linear_gemv({fmt!r}, {group})")


def check_dequant_linear(fmt: str, group: int, device: str = "cpu") -> None:
    """dequantize_triton gives dequantize_weight's values (whole, and rows from a block on; N
    and K not multiples of the tiles); dequant_linear in several slices, with a bias, equals the
    product with the dequantized weight; quant_linear takes that path from DEQUANT_MIN_ROWS rows on.
    On CPU tensors it needs TRITON_INTERPRET=1."""
    gen = torch.Generator(device).manual_seed(group + len(fmt))
    N, K = 200, 384
    qw = make_qweight(torch.randn(N, K, generator=gen, device=device) * 0.05, fmt, group)
    for dtype in (torch.float32, torch.bfloat16):
        want = gk.dequantize_weight(qw, dtype)
        got, rows = quant.dequantize_triton(qw, dtype), quant.dequantize_triton(qw, dtype, slice(group, None))
        if dtype == torch.bfloat16 and device == "cpu":  # the interpreter truncates to bf16, CUDA rounds
            torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
            torch.testing.assert_close(rows, want[group:], rtol=2**-7, atol=0)
        else:
            assert torch.equal(got, want) and torch.equal(rows, want[group:])
    x = torch.randn(quant.DEQUANT_MIN_ROWS, K, generator=gen, device=device).bfloat16()
    b = torch.randn(N, generator=gen, device=device)
    w = gk.dequantize_weight(qw, torch.bfloat16)
    sliced = quant.dequant_linear(x, qw, b, slice_bytes=K * 2 * group)  # a slice a group of rows
    assert sliced.shape == (x.shape[0], N)
    assert rel_err(sliced, x.double() @ w.double().T + b.double()) < 1e-2  # bf16 products and output
    assert torch.equal(quant.quant_linear_triton(x, qw, b), quant.dequant_linear(x, qw, b))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
@pytest.mark.parametrize("fmt,group", [("int8", 128), ("int4", 32), ("fp8", 128), ("fp8-blocks", 64)])
def test_dequant_linear_in_interpreter(fmt, group):
    in_interpreter(f"check_dequant_linear({fmt!r}, {group})")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "fmt,group", [("int8", 128), ("int4", 32), ("int4", 128), ("fp8", 128), ("fp8-blocks", 128)]
)
def test_dequant_linear(fmt, group):
    check_dequant_linear(fmt, group, "cuda")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 64)])
def test_moe_packed_kernels_in_interpreter(fmt, group):
    in_interpreter(f"check_moe_packed({fmt!r}, {group})")


def test_packed_moe_rejects_other_formats():
    x, ids, weights, views, _ = packed_moe_inputs(1, 2, "int8", 64)
    with pytest.raises(ValueError, match="int4 or int8"):
        moe_gemv.fused_moe_packed(x, "bf16", *views, 64, ids, weights)


def compile_for_hopper(kernel, const: dict, types: dict, **options) -> str:
    """Compile a @triton.jit kernel to sm_90 machine code, no GPU needed: `const` gives its constexprs,
    `types` every pointer's (and any non-int32 scalar's) type; other arguments are int32. `options`
    (num_warps, num_stages) go to the compiler. Returns the PTX."""
    from gpu_kernels.sass import compile_for

    return compile_for(kernel, const, types, **options).ptx


# the GEMV kernels' format ids (1 fp8, 2 int8, 3 int4, 4 / 5 the CPU kernels' int4 / int8) and DOT4
GEMV_COMPILE = [(1, 0, "*fp8e4nv", "*fp32", 128), (2, 0, "*i8", "*fp32", 128), (3, 0, "*u8", "*fp32", 64)]
GEMV_COMPILE += [(4, 0, "*u8", "*fp16", 32), (5, 0, "*u8", "*fp32", 64)]
GEMV_COMPILE += [(3, 1, "*i32", "*fp32", 128), (2, 1, "*i32", "*fp32", 128)]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (compiles without a GPU)")
@pytest.mark.parametrize("fmt,dot4,w,s,group", GEMV_COMPILE)
def test_gemv_kernels_compile_for_hopper(fmt, dot4, w, s, group):
    """The GEMV kernels compile to sm_90 machine code here, without a GPU: the interpreter runs what the
    compiler may reject (a jit helper's result where a constexpr is needed, inline PTX)."""
    tiles = {
        "FMT": fmt,
        "GROUP": group,
        "BLOCK_N": 32,
        "BLOCK_K": 256,
        "ITERS": 1,
        "SPLIT_K": 8,
        "DOT4": dot4,
    }
    types = {"w_ptr": w, "s_ptr": s, "ids_ptr": "*i32", "stride_we": "i64"}
    gate_up = {"x_ptr": "*bf16", "p_ptr": "*fp32", **types}
    compile_for_hopper(
        moe_gemv._moe_gemv_gate_up_kernel, {**tiles, "TOPK": 6, "USE_PDL": 1, "SROW": 1}, gate_up
    )
    down = {"p_ptr": "*fp32", "tw_ptr": "*fp32", "o_ptr": "*fp32", **types}
    compile_for_hopper(moe_gemv._moe_gemv_down_kernel, {**tiles, "USE_PDL": 1}, down)
    if fmt <= 3:  # quant_linear's GEMV path shares the tiles
        from gpu_kernels import linear_gemv

        lin = {"x_ptr": "*bf16", "w_ptr": w, "s_ptr": s, "b_ptr": "*bf16", "o_ptr": "*fp32"}
        compile_for_hopper(linear_gemv._linear_gemv_kernel, {**tiles, "HAS_BIAS": 1, "ROWS": 4}, lin)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (compiles without a GPU)")
def test_fp8_block_linear_kernels_compile_for_hopper():
    """The quantized linear's GEMV and tl.dot kernels over block-scaled fp8 compile for sm_90."""
    from gpu_kernels import linear_gemv

    types = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": "*bf16", "o_ptr": "*fp32"}
    gemv = {"FMT": quant.FP8_BLOCKS, "GROUP": 128, "BLOCK_N": 32, "BLOCK_K": 256, "ITERS": 2, "SPLIT_K": 4}
    gemv["ROWS"] = 3
    compile_for_hopper(linear_gemv._linear_gemv_kernel, {**gemv, "DOT4": 0, "HAS_BIAS": 1}, types)
    dot = {"FMT": quant.FP8_BLOCKS, "GROUP": 128, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "HAS_BIAS": 1}
    compile_for_hopper(quant._quant_linear_kernel, {**dot, "SPLIT_K": 1}, {**types, "o_ptr": "*bf16"})
    compile_for_hopper(quant._quant_linear_kernel, {**dot, "SPLIT_K": 4}, types)  # float32 partial sums


def run_ptx(code: str, word: int, half: torch.dtype) -> dict[str, float]:
    """Step through the straight-line PTX of an inline_asm_elementwise string (the operations
    int4_words_to_half uses) on one 32-bit input $8: its 16-bit outputs {"$k": value in `half`}."""
    import re

    regs, outs = {"$8": word}, {}

    def val(x: str) -> int:
        return int(x, 0) if x[0].isdigit() else regs[x]

    def halves(v: int) -> torch.Tensor:
        return torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(half).float()

    for stmt in (s.strip() for s in code.strip("{}").split(";")):
        if not stmt or stmt.startswith(".reg"):
            continue
        pair = re.fullmatch(r"mov\.b32 \{(\$\d), (\$\d)\}, (\w+)", stmt)
        if pair:
            lo, hi = halves(val(pair[3]))
            outs[pair[1]], outs[pair[2]] = float(lo), float(hi)
            continue
        op, args = stmt.split(None, 1)
        d, *a = [x.strip() for x in args.split(",")]
        if op == "mov.b32":
            regs[d] = val(a[0])
        elif op in ("and.b32", "or.b32", "shr.b32"):
            x, y = val(a[0]), val(a[1])
            regs[d] = {"and.b32": x & y, "or.b32": x | y, "shr.b32": x >> y}[op]
        elif op in ("fma.rn.bf16x2", "fma.rn.f16x2"):
            r = (halves(val(a[0])) * halves(val(a[1])) + halves(val(a[2]))).to(half).view(torch.int16)
            regs[d] = (int(r[0]) & 0xFFFF) | ((int(r[1]) & 0xFFFF) << 16)
        else:
            raise AssertionError(f"no model of {op!r}")
    return outs


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (the PTX strings are triton constexprs)")
@pytest.mark.parametrize("name,half", [("_INT4_BF16", torch.bfloat16), ("_INT4_F16", torch.float16)])
def test_int4_ptx_gives_each_nibble_minus_eight(name, half):
    """int4_words_to_half's PTX, stepped through here (the interpreter cannot run it): output $k is
    nibble k of the word (column 8c + k of its row) less 8, exactly, in the 16-bit type."""
    code = getattr(quant, name).value
    gen = torch.Generator().manual_seed(5)
    words = [0, 0xFFFFFFFF, 0x76543210, 0x88888888] + torch.randint(0, 2**32, (60,), generator=gen).tolist()
    for word in words:
        outs = run_ptx(code, word, half)
        assert outs == {f"${k}": float(((word >> 4 * k) & 0xF) - 8) for k in range(8)}, hex(word)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (compiles without a GPU)")
@pytest.mark.parametrize("half,code", [("*bf16", "fma.rn.bf16x2"), ("*fp16", "fma.rn.f16x2")])
def test_int4_ptx_tiles_compile_for_hopper(half, code):
    """The tl.dot kernels' int4 tiles by PTX (ASM; Triton's interpreter cannot run it, the GPU tests
    check its bits against the float path) compile for sm_90, in the activations' 16-bit type."""
    tiles = {"FMT": 3, "GROUP": 128, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "ASM": 1}
    types = {"x_ptr": half, "w_ptr": "*u8", "s_ptr": "*fp32", "b_ptr": half, "o_ptr": half}
    ptx = compile_for_hopper(quant._quant_linear_kernel, {**tiles, "HAS_BIAS": 1, "SPLIT_K": 1}, types)
    assert code in ptx
    ptrs = {"w_ptr": "*u8", "s_ptr": "*fp32", "sorted_ptr": "*i32", "expert_ptr": "*i32", "npad_ptr": "*i32"}
    gate_up = {**ptrs, "x_ptr": half, "h_ptr": half, "stride_we": "i64"}
    assert code in compile_for_hopper(moe._moe_gate_up_kernel, {**tiles, "TOPK": 6}, gate_up)
    down = {**ptrs, "h_ptr": half, "tw_ptr": "*fp32", "o_ptr": half, "stride_we": "i64"}
    assert code in compile_for_hopper(moe._moe_down_kernel, tiles, down)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (compiles without a GPU)")
@pytest.mark.parametrize("ids,ep", [("*i32", 128), ("*i64", 256)])
def test_align_kernels_compile_for_hopper(ids, ep):
    """The sorted path's align kernels compile for sm_90 (int32 or int64 expert ids, 256 experts)."""
    ptrs = {"ids": ids, "counts": "*i32", "sorted_ids": "*i32", "expert_ids": "*i32", "num_padded": "*i32"}
    count = {"ids": ids, "counts": "*i32"}
    compile_for_hopper(moe._align_count_kernel, {"SLOTS": 128, "EP": ep}, count, num_warps=4)
    const = {"BM": 64, "SLOTS": 128, "EP": ep, "ROWS": 16}
    compile_for_hopper(moe._align_place_kernel, const, ptrs, num_warps=8)


# weight formats as the tl.dot kernels read them: (FMT, data, scales, group)
DOT_COMPILE = [(0, "*bf16", "*bf16", 128), (1, "*fp8e4nv", "*fp32", 128), (2, "*i8", "*fp32", 128)]
DOT_COMPILE += [(3, "*u8", "*fp32", 64)]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (compiles without a GPU)")
@pytest.mark.parametrize("fmt,w,s,group", DOT_COMPILE)
def test_dot_kernels_compile_for_hopper(fmt, w, s, group):
    """The sorted fused-MoE and tl.dot quantized-linear kernels compile for sm_90, every weight format."""
    tiles = {"FMT": fmt, "GROUP": group, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
    ptrs = {"w_ptr": w, "s_ptr": s, "sorted_ptr": "*i32", "expert_ptr": "*i32", "npad_ptr": "*i32"}
    ptrs.update(stride_we="i64")
    gate_up = {"x_ptr": "*bf16", "h_ptr": "*bf16", **ptrs}
    compile_for_hopper(moe._moe_gate_up_kernel, {**tiles, "TOPK": 6}, gate_up)
    down = {"h_ptr": "*bf16", "tw_ptr": "*fp32", "o_ptr": "*bf16", **ptrs}
    compile_for_hopper(moe._moe_down_kernel, tiles, down)
    lin = {"x_ptr": "*bf16", "w_ptr": w, "s_ptr": s, "b_ptr": "*bf16", "o_ptr": "*bf16"}
    compile_for_hopper(quant._quant_linear_kernel, {**tiles, "HAS_BIAS": 1, "SPLIT_K": 1}, lin)


_DECODE_OUT = {"o_ptr": "*fp32", "lse_ptr": "*fp32", "bt_ptr": "*i32", "len_ptr": "*i32", "qk_scale": "fp32"}


def _gqa_signature(kv: str) -> tuple[dict, dict]:
    """GQA decode's argument types over a `kv` cache, and its shape constexprs (Qwen3-30B-A3B's heads,
    16-token blocks, PTX conversions); the tile settings are the caller's."""
    types = {"q_ptr": "*bf16", "k_ptr": kv, "v_ptr": kv, "ks_ptr": "*fp32", "vs_ptr": "*fp32", **_DECODE_OUT}
    shape = {"HKV": 4, "GROUP": 8, "G_PAD": 16, "D": 128, "D_PAD": 128, "DV": 128, "DV_PAD": 128}
    return types, {**shape, "BLOCK_SIZE": 16, "ASM": 1}


def _chain_kernels() -> list[tuple[str, object, dict, dict, bool]]:
    """(name, kernel, constexprs, pointer / scalar types, whether its weights load before its wait) for
    the decode chain's kernels (gpu_kernels._triton.chain_pdl)."""
    from gpu_kernels import gemv_tiles, linear_gemv, norm, rope

    bf = "*bf16"
    rows = {"x_ptr": bf, "w_ptr": bf, "s_ptr": bf, "y_ptr": bf, "eps": "fp32"}
    gemv = {"FMT": 1, "GROUP": 128, "HAS_BIAS": 0, "BLOCK_N": 32, "BLOCK_K": 512, "ITERS": 1, "SPLIT_K": 8}
    gemv.update(ROWS=1, DOT4=0)
    lin = {"x_ptr": bf, "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "b_ptr": bf, "o_ptr": "*fp32"}
    route = {**router._choice_constants(128, None, 8, "softmax", "greedy", 1, 1, True), "ROUND": 1}
    route.update(BLOCK_E=1, BLOCK_H=2048)
    route_types = {"x_ptr": bf, "w_ptr": bf, "bias_ptr": bf, "logits_ptr": "*fp32", "count_ptr": "*i32"}
    route_types.update({"ids_ptr": "*i64", "weights_ptr": "*fp32", "scale": "fp32", "renorm_eps": "fp32"})
    gqa_rope = {"HQ": 32, "HKV": 4, "HALF": 64, "HALF_PAD": 64, "HAS_NORM": 1}
    rope_types = {
        n: bf for n in ("q_ptr", "k_ptr", "v_ptr", "qo_ptr", "cos_ptr", "sin_ptr", "qw_ptr", "kw_ptr")
    }
    rope_types.update({"kc_ptr": bf, "vc_ptr": bf, "slot_ptr": "*i64", "eps": "fp32"})
    mla_rope = {"H": 16, "H_PAD": 16, "NOPE": 128, "R": 512, "R_PAD": 512, "HALF": 32, "HALF_PAD": 32}
    mla_types = {n: bf for n in ("q_ptr", "kv_ptr", "cos_ptr", "sin_ptr", "w_ptr", "cache_ptr")}
    mla_types.update({"slot_ptr": "*i64", "eps": "fp32"})
    absorb = {"DI": 128, "DJ": 512, "HEADS": 16, "BLOCK_I": 128, "BLOCK_J": 64}
    parts = {"H": 2048, "BLOCK": 2048, "N": 2, "C0": 0, "C1": 1, "C2": 0, "C3": 0, "S0": 8}
    parts_types = {**rows, **{f"a{i}": "i64" for i in range(4)}}
    sums = {"TOPK": 1, "ROWS": 8, "BLOCK_R": 8, "BLOCK_H": 256}
    return [
        ("add_rms_norm", norm._add_rms_norm_kernel, {"H": 2048, "BLOCK": 2048}, {**rows, "d_ptr": bf}, True),
        ("add_parts_rms_norm", norm._add_parts_rms_norm_kernel, parts, parts_types, True),
        ("linear_gemv", linear_gemv._linear_gemv_kernel, gemv, lin, True),
        ("split_sum", gemv_tiles._split_sum_kernel, sums, {"p_ptr": "*fp32", "o_ptr": bf}, False),
        ("route", router._route_kernel, route, route_types, True),
        ("gqa_rope", rope._gqa_rope_kernel, gqa_rope, rope_types, False),
        ("mla_rope", rope._mla_rope_kernel, mla_rope, mla_types, False),
        ("absorb", mla_attention._absorb_kernel, absorb, {"x_ptr": bf, "w_ptr": bf, "o_ptr": bf}, False),
    ]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (compiles without a GPU)")
@pytest.mark.parametrize("which", range(8))
def test_decode_chain_kernels_compile_for_hopper(which):
    """Under the decode chain's dependent launch each kernel lets the next launch and waits for the one
    before; the norms, GEMV and router issue their weight loads before that wait; without it, neither."""
    name, kernel, const, types, weights_first = _chain_kernels()[which]
    ptx = compile_for_hopper(kernel, {**const, "USE_PDL": 1}, types, num_warps=4)
    assert "griddepcontrol.launch_dependents" in ptx and "griddepcontrol.wait" in ptx, name
    first_load, wait = ptx.find("ld.global"), ptx.find("griddepcontrol.wait")
    assert (0 <= first_load < wait) == weights_first, name
    plain = compile_for_hopper(kernel, {**const, "USE_PDL": 0}, types, num_warps=4)
    assert "griddepcontrol" not in plain, name


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (compiles without a GPU)")
@pytest.mark.parametrize("quant_kind,kv", [(0, "*bf16"), (1, "*i8"), (2, "*fp8e4nv")])
def test_attention_kernels_compile_for_hopper(quant_kind, kv):
    """GQA decode (bf16, int8 and fp8 caches), the split merge and MLA decode compile for sm_90."""
    gqa, shape = _gqa_signature(kv)
    # each PDL flag: launched early (waits for the kernel before), and letting the merge launch early
    shape.update(BLOCK_N=64, QUANT=quant_kind, BT_AHEAD=2 - quant_kind % 2, PDL=quant_kind + 1)
    ptx = compile_for_hopper(paged_attention._gqa_decode_kernel, shape, gqa)
    # an int8 cache becomes float16 by byte permutes, V through ldmatrix's transposing loads
    assert ("prmt.b32" in ptx and ".trans" in ptx) or quant_kind != 1
    assert ("griddepcontrol.wait" in ptx) == bool(shape["PDL"] & 2)
    assert ("griddepcontrol.launch_dependents" in ptx) == bool(shape["PDL"] & 1)
    merge = {"o_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "len_ptr": "*i32"}
    merge_const = {"HEADS": 16, "D": 512, "BLOCK_D": 32, "BLOCK_S": 64, "PDL": quant_kind % 2}
    compile_for_hopper(paged_attention._merge_splits_kernel, merge_const, merge)
    if quant_kind == 0:
        mla = {"ql_ptr": "*bf16", "qp_ptr": "*bf16", "c_ptr": "*bf16", **_DECODE_OUT}
        for H in (16, 128):  # each head count's default settings; 128 heads' dots take warpgroup MMA
            cfg = mla_attention.mla_decode_config(1, H)
            const = {"H": H, "R": 512, "P": 64, "BLOCK_SIZE": 16, "PDL": cfg.get("PDL", 0)}
            const.update({k: cfg[k] for k in ("BLOCK_H", "BLOCK_N", "BT_AHEAD", "CHUNKS")})
            launch = {k: cfg[k] for k in ("num_warps", "num_stages")}
            ptx = compile_for_hopper(mla_attention._mla_decode_kernel, const, mla, **launch)
            assert ("wgmma" in ptx) == (cfg["BLOCK_H"] >= 64)


def test_longest_loop_reads_the_main_loop_of_sass():
    from gpu_kernels.sass import longest_loop

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA 0x40 ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/               @P1 HMMA.16816.F32 R8, R4, R6, R8 ;
        /*0040*/                   IADD3 R2, R2, 0x10, RZ ;
        /*0050*/              @!P2 BRA 0x20 ;
        /*0060*/                   EXIT ;
    """
    count, ops = longest_loop(sass)
    assert count == 4 and ops == {"LDG.E.128": 1, "HMMA.16816.F32": 1, "IADD3": 1, "BRA": 1}
    assert longest_loop("        /*0000*/                   EXIT ;") == (0, {})


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (compiles without a GPU)")
def test_machine_code_report_of_a_decode_kernel():
    """compile_for reads registers and the main loop; pointers aligned as at a launch, the int8 cache's
    tile loads vectorize (fewer instructions than the same kernel compiled unaligned)."""
    from gpu_kernels.sass import compile_for

    types, const = _gqa_signature("*i8")
    const.update(BLOCK_N=128, QUANT=1, BT_AHEAD=1, PDL=0)
    aligned = compile_for(paged_attention._gqa_decode_kernel, const, types, num_warps=4, num_stages=2)
    loose = compile_for(
        paged_attention._gqa_decode_kernel, const, types, aligned=False, num_warps=4, num_stages=2
    )
    assert 0 < aligned.registers <= 255 and aligned.shared_bytes > 0
    assert 0 < aligned.loop < loose.loop and aligned.loop_mix["HMMA.16816.F32"] == 64  # 128 tokens, 4 warps


@pytest.mark.parametrize("rows,heads,ctx", [(1, 4, 32768), (16, 4, 32768), (3, 1, 700), (64, 8, 100)])
def test_decode_partitions_cover_the_context(rows, heads, ctx):
    """Every default launch setting splits a row's context into whole tiles that cover it, within
    the split cap; a config entry overrides its default."""
    for quantized in (False, True):
        cfg = paged_attention.gqa_decode_config(rows, heads, 128, quantized)
        part = paged_attention.pick_partition(
            rows, heads, ctx, cfg["BLOCK_N"], torch.device("cpu"), cfg["WAVES"], cfg["MAX_SPLITS"]
        )
        splits = -(-ctx // part)
        assert part % cfg["BLOCK_N"] == 0 and splits * part >= ctx and splits <= cfg["MAX_SPLITS"]
    for H in (16, 128):
        cfg = mla_attention.mla_decode_config(rows, H)
        assert H % cfg["BLOCK_H"] == 0 or cfg["BLOCK_H"] >= H
    assert paged_attention.gqa_decode_config(rows, heads, 128, False, {"BLOCK_N": 32})["BLOCK_N"] == 32


def test_decode_attention_takes_a_device_sweep(tmp_path, monkeypatch):
    """A device's swept settings (configs/gqa_decode.json, mla_decode.json) replace the defaults for the
    shapes swept, at the nearest row count; other shapes keep them, and a config argument still wins."""
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    tuning._load.cache_clear()
    dev = tuning.device_name()
    swept = {"BLOCK_N": 64, "WAVES": 3, "MAX_SPLITS": 192}
    try:
        tuning.save_configs("gqa_decode", {dev: {paged_attention.gqa_key(4, 128, "int8"): {1: swept}}})
        tuning.save_configs("mla_decode", {dev: {mla_attention.mla_key(128): {16: {"BLOCK_H": 32}}}})
        cfg = paged_attention.gqa_decode_config(2, 4, 128, True)
        assert {k: cfg[k] for k in swept} == swept and cfg["num_warps"] == 4  # the default where silent
        assert paged_attention.gqa_decode_config(1, 4, 128, False) == paged_attention._gqa_default(
            1, 4, 128, False
        )
        assert paged_attention.gqa_decode_config(1, 4, 128, True, {"BLOCK_N": 32})["BLOCK_N"] == 32
        assert mla_attention.mla_decode_config(8, 128)["BLOCK_H"] == 32
        assert mla_attention.mla_decode_config(8, 16) == mla_attention._mla_default(8, 16)
    finally:
        tuning._load.cache_clear()


def check_decode_attention(kind: str, bt_ahead: int = 0, chunks: int = 1) -> None:
    """Run with TRITON_INTERPRET=1: GQA (bf16 and int8 caches) or MLA decode on CPU tensors against the
    references, with tiles small enough that rows split into more partitions than the merge takes at once.
    The interpreter's bf16 dots are wrong, so tiles are float32 (fp16 queries for the int8 cache).
    bt_ahead: the kernels' BT_AHEAD (block ids loaded one tile ahead); chunks: MLA's latent chunks."""
    gen = torch.Generator().manual_seed(len(kind))
    bs, lens = 16, [700, 1, 333]
    nb = sum(math.ceil(n / bs) for n in lens) + 2
    table = make_block_tables(lens, bs, nb, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    cfg = {"BLOCK_N": 16, "MAX_SPLITS": 64, "num_warps": 4, "num_stages": 2}  # 700 tokens -> 44 splits
    cfg["BT_AHEAD"] = bt_ahead
    if kind == "mla":
        R, P, H = 64, 16, 5
        cache = torch.randn(nb, bs, R + P, generator=gen)
        ql, qp = torch.randn(3, H, R, generator=gen), torch.randn(3, H, P, generator=gen)
        cfg.update(BLOCK_H=16, CHUNKS=chunks)
        out = mla_decode_attention_triton(ql, qp, cache, table, seq_lens, 0.1, config=cfg)
        ref = gk.mla_decode_attention_reference(ql, qp, cache, table, seq_lens, 0.1)
    else:
        Hq, Hkv, D = 6, 2, 32
        kc, vc = (torch.randn(nb, bs, Hkv, D, generator=gen) for _ in range(2))
        q = torch.randn(3, Hq, D, generator=gen)
        ks = vs = None
        if kind == "int8":
            (kc, ks), (vc, vs) = (
                kv_write.quantize_per_token(kc, torch.int8),
                kv_write.quantize_per_token(vc, torch.int8),
            )
            q = q.half()
        out = paged_decode_attention_triton(q, kc, vc, table, seq_lens, D**-0.5, ks, vs, config=cfg)
        ref = paged_attention.paged_decode_attention_reference(
            q.float(),
            *((kc.float(), vc.float()) if ks is None else (kc, vc)),
            table,
            seq_lens,
            D**-0.5,
            ks,
            vs,
        )
    print(f"{kind}: max error {(out.float() - ref).abs().max():.2e}")
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert rel_err(out, ref) < 1e-2
    if kind == "float32":
        # The merge alone, over more splits than it reads at once, some of them empty: row 0's
        # context fills 201 of its 300 splits of 4 tokens, row 1's all; what lies past a row's
        # context (NaN here) is never read.
        o, lse = torch.randn(2, 3, 300, 40, generator=gen), torch.randn(2, 3, 300, generator=gen)
        lse[0, 1, 7:201] = float("-inf")
        o[0, :, 201:], lse[0, :, 201:] = float("nan"), float("nan")
        lens = torch.tensor([801, 1200], dtype=torch.int32)
        merged = paged_attention.merge_splits(o, lse, torch.empty(2, 3, 40), lens, 4)
        for row, used in ((0, 201), (1, 300)):
            w = torch.softmax(lse[row, :, :used] * math.log(2), -1)  # lse is in log2
            want = (o[row, :, :used] * w[..., None]).sum(1)
            torch.testing.assert_close(merged[row], want, rtol=1e-5, atol=1e-5)


def test_mla_latent_chunks_stay_a_dot_wide():
    """A latent narrower than four 16-column dots takes fewer chunks; a setting other than 1, 2, 4 is refused."""
    assert [mla_attention._chunks(R, 4) for R in (512, 64, 32, 16)] == [4, 4, 2, 1]
    assert mla_attention._chunks(512, 1) == 1
    with pytest.raises(AssertionError):
        mla_attention._chunks(512, 3)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
@pytest.mark.parametrize(
    "kind,bt_ahead,chunks",
    [("float32", 0, 1), ("int8", 0, 1), ("mla", 0, 1), ("int8", 1, 1), ("mla", 1, 4), ("float32", 2, 1)]
    + [("mla", 2, 2)],
)
def test_decode_attention_kernels_in_interpreter(kind, bt_ahead, chunks):
    in_interpreter(f"check_decode_attention({kind!r}, {bt_ahead}, {chunks})")


# ---------------------------------------------------------------- GPU: Triton kernels vs references

gpu = pytest.mark.gpu
CUDA = "cuda"


def _rand_cache(nb, bs, hkv, d, dtype, gen):
    return torch.randn(nb, bs, hkv, d, generator=gen, device=CUDA).to(dtype)


@gpu
@pytest.mark.parametrize("cache", ["bf16", "int8", "fp8"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_kernel(cache, block_size):
    gen = torch.Generator(CUDA).manual_seed(10)
    T, Hkv, D, nb = 37, 4, 128, 8
    k = torch.randn(T, Hkv, D, generator=gen, device=CUDA).bfloat16()
    v = torch.randn(T, Hkv, D, generator=gen, device=CUDA).bfloat16()
    slots = torch.randperm(nb * block_size, generator=gen, device=CUDA)[:T]
    slots[3] = -1
    dtype = {"bf16": torch.bfloat16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[cache]
    outs = []
    for fn in (kv_write.write_kv_triton, kv_write.write_kv_reference):
        kc = torch.zeros(nb, block_size, Hkv, D, device=CUDA).to(dtype)
        vc = kc.clone()
        sc = (torch.zeros(nb, block_size, Hkv, device=CUDA), torch.zeros(nb, block_size, Hkv, device=CUDA))
        sc = sc if cache != "bf16" else (None, None)
        fn(k, v, kc, vc, slots, *sc)
        outs.append(
            [kv_write.dequantize_per_token(c, s, torch.float32) for c, s in zip((kc, vc), sc, strict=True)]
        )
    for a, b in zip(*outs, strict=True):
        # one e4m3 step is 1/8 relative; ties may round differently between the two paths
        tol = {"bf16": 0.0, "int8": 0.03, "fp8": 0.07}[cache]
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@gpu
@pytest.mark.parametrize("N", [1, 16])
@pytest.mark.parametrize("lens", ["short", "long"])
@pytest.mark.parametrize("heads", [(32, 4, 128), (16, 16, 64), (8, 1, 128)])
@pytest.mark.parametrize("cache", ["bf16", "fp16", "int8", "fp8"])
def test_paged_decode_kernel(N, lens, heads, cache):
    gen = torch.Generator(CUDA).manual_seed(N * 7 + len(lens))
    Hq, Hkv, D = heads
    bs = 16
    lo, hi = (1, 100) if lens == "short" else (1000, 5000)
    seq_lens = torch.randint(lo, hi, (N,), generator=gen, device=CUDA).int()
    nb = int(((seq_lens + bs - 1) // bs).sum()) + 3
    table = make_block_tables(seq_lens.tolist(), bs, nb, torch.Generator().manual_seed(N)).to(CUDA)
    qdt = torch.float16 if cache == "fp16" else torch.bfloat16
    q = torch.randn(N, Hq, D, generator=gen, device=CUDA).to(qdt)
    kc, vc = _rand_cache(nb, bs, Hkv, D, torch.float32, gen), _rand_cache(nb, bs, Hkv, D, torch.float32, gen)
    ks = vs = None
    if cache in ("int8", "fp8"):
        cdt = torch.int8 if cache == "int8" else torch.float8_e4m3fn
        (kc, ks), (vc, vs) = kv_write.quantize_per_token(kc, cdt), kv_write.quantize_per_token(vc, cdt)
    else:
        kc, vc = kc.to(qdt), vc.to(qdt)
    scale = D**-0.5
    out = paged_decode_attention_triton(q, kc, vc, table, seq_lens, scale, ks, vs)
    ref = paged_attention.paged_decode_attention_reference(
        q.float(), *((kc.float(), vc.float()) if ks is None else (kc, vc)), table, seq_lens, scale, ks, vs
    )
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert rel_err(out, ref) < 1e-2


@gpu
@pytest.mark.parametrize("N", [1, 4])
@pytest.mark.parametrize("H", [16, 128])
@pytest.mark.parametrize("max_len", [37, 3000])
def test_mla_decode_kernel(N, H, max_len):
    gen = torch.Generator(CUDA).manual_seed(N + H + max_len)
    R, P, bs = 512, 64, 16
    seq_lens = torch.randint(1, max_len + 1, (N,), generator=gen, device=CUDA).int()
    seq_lens[0] = max_len
    nb = int(((seq_lens + bs - 1) // bs).sum()) + 2
    table = make_block_tables(seq_lens.tolist(), bs, nb, torch.Generator().manual_seed(H)).to(CUDA)
    cache = torch.randn(nb, bs, R + P, generator=gen, device=CUDA).bfloat16()
    ql = torch.randn(N, H, R, generator=gen, device=CUDA).bfloat16()
    qp = torch.randn(N, H, P, generator=gen, device=CUDA).bfloat16()
    scale = (128 + 64) ** -0.5
    out = mla_decode_attention_triton(ql, qp, cache, table, seq_lens, scale)
    ref = gk.mla_decode_attention_reference(ql.float(), qp.float(), cache.float(), table, seq_lens, scale)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert rel_err(out, ref) < 1e-2


@gpu
@pytest.mark.parametrize("kind", ["bf16", "int8", "mla"])
def test_decode_attention_with_dependent_launch_matches(kind):
    """Programmatic dependent launch (PDL 1: the merge launches while the split kernel runs; 2: the
    split kernel while the kernel before it runs) changes when kernels start, never the bits: a CUDA
    graph of calls, each on a query the kernel just before it wrote, matches eager calls without it."""
    gen = torch.Generator(CUDA).manual_seed(5)
    bs, ctx, calls = 16, 5000, 4
    seq_lens = torch.tensor([ctx], dtype=torch.int32, device=CUDA)
    nb = -(-ctx // bs) + 1
    table = make_block_tables([ctx], bs, nb, torch.Generator().manual_seed(3)).to(CUDA)
    if kind == "mla":
        latent = torch.randn(nb, bs, 576, generator=gen, device=CUDA).bfloat16()
        qp = torch.randn(1, 16, 64, generator=gen, device=CUDA).bfloat16()
        src = [torch.randn(1, 16, 512, generator=gen, device=CUDA).bfloat16() for _ in range(calls)]

        def attend(q, config):
            return mla_decode_attention_triton(q, qp, latent, table, seq_lens, 0.07, config=config)
    else:
        kc, vc = (_rand_cache(nb, bs, 4, 128, torch.float32, gen) for _ in range(2))
        ks = vs = None
        if kind == "int8":
            (kc, ks), (vc, vs) = (
                kv_write.quantize_per_token(kc, torch.int8),
                kv_write.quantize_per_token(vc, torch.int8),
            )
        else:
            kc, vc = kc.bfloat16(), vc.bfloat16()
        src = [torch.randn(1, 32, 128, generator=gen, device=CUDA).bfloat16() for _ in range(calls)]

        def attend(q, config):
            return paged_decode_attention_triton(q, kc, vc, table, seq_lens, 0.088, ks, vs, config=config)

    want = [attend(s, {"PDL": 0}) for s in src]
    q = torch.empty_like(src[0])
    for pdl in (1, 3):
        attend(q, {"PDL": pdl})  # compile outside the capture
        graph, outs = torch.cuda.CUDAGraph(), []
        with torch.cuda.graph(graph):
            for s in src:
                torch.mul(s, 1, out=q)  # a kernel writes the query just before the split kernel
                outs.append(attend(q, {"PDL": pdl}))
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, want):
            assert torch.equal(got, ref), f"PDL {pdl}: {(got.float() - ref.float()).abs().max()}"


@gpu
def test_decode_attention_compiles_once_as_contexts_grow():
    """Eager steps meet ever longer contexts. Specialized on values that follow the context (split
    count, partition, block-table stride), a decode kernel would compile anew for new lengths, a
    second or more inside a served step. After a first call, longer contexts may compile only the
    split merge's second tile shape, once per head width (MLA's latent and GQA's heads)."""
    from triton import knobs

    gen = torch.Generator(CUDA).manual_seed(11)
    bs, H, R, P, Hkv, D = 16, 16, 512, 64, 4, 128
    ql = torch.randn(1, H, R, generator=gen, device=CUDA).bfloat16()
    qp = torch.randn(1, H, P, generator=gen, device=CUDA).bfloat16()
    q = torch.randn(1, 4 * Hkv, D, generator=gen, device=CUDA).bfloat16()

    def attend(ctx: int) -> None:
        seq_lens = torch.tensor([ctx], dtype=torch.int32, device=CUDA)
        nb = -(-ctx // bs) + 1
        table = make_block_tables([ctx], bs, nb, torch.Generator().manual_seed(ctx)).to(CUDA)
        latent = torch.randn(nb, bs, R + P, generator=gen, device=CUDA).bfloat16()
        mla_decode_attention_triton(ql, qp, latent, table, seq_lens, (128 + 64) ** -0.5)
        kc = _rand_cache(nb, bs, Hkv, D, torch.float32, gen).bfloat16()
        vc = _rand_cache(nb, bs, Hkv, D, torch.float32, gen).bfloat16()
        paged_decode_attention_triton(q, kc, vc, table, seq_lens, D**-0.5)

    attend(40)
    compiled: list[str] = []

    def hook(**kw) -> bool:
        compiled.append(kw["repr"].split("[")[0])
        return False

    before, knobs.runtime.jit_post_compile_hook = knobs.runtime.jit_post_compile_hook, hook
    try:
        for ctx in (300, 3000, 20000):
            attend(ctx)
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_post_compile_hook = before
    assert "_mla_decode_kernel" not in compiled and "_gqa_decode_kernel" not in compiled, compiled
    assert compiled.count("_merge_splits_kernel") <= 2, compiled


@gpu
@pytest.mark.parametrize("M", [1, 16, 64, 200])
@pytest.mark.parametrize(
    "fmt,group",
    [("bf16", 128), ("int8", 128), ("int4", 32), ("int4", 128), ("fp8", 128), ("fp8-blocks", 128)],
)
def test_quant_linear_kernel(M, fmt, group):
    gen = torch.Generator(CUDA).manual_seed(M)
    N, K = 320, 1024
    w = torch.randn(N, K, generator=gen, device=CUDA) * 0.05
    qw = make_qweight(w, fmt, group)
    fmt = qw.fmt
    x = torch.randn(M, K, generator=gen, device=CUDA).bfloat16()
    b = torch.randn(N, generator=gen, device=CUDA).bfloat16()
    ref = F.linear(x.float(), gk.dequantize_weight(qw, torch.float32), b.float())
    default = quant.quant_linear_config(M, N, K, fmt, group, qw.blocked)
    configs = [default]
    if fmt != "bf16" and M <= 16:  # both paths: tl.dot tiles, and the GEMV each DP4A way
        from gpu_kernels import linear_gemv

        gemv = linear_gemv.linear_gemv_config(M, N, K, fmt)
        configs += [gemv, {**quant._DEFAULT, "BLOCK_K": 32}, {**quant._DEFAULT, "BLOCK_K": 32, "SPLIT_K": 4}]
        if fmt in ("int8", "int4"):
            configs.append({**configs[1], "DP4A": 1 - configs[1].get("DP4A", 0)})
    for cfg in configs:
        out = quant.quant_linear_triton(x, qw, b, cfg)
        if cfg.get("DP4A") and "BLOCK_M" not in cfg:  # activations rounded to int8: ~1.5% of the norm
            assert rel_err(out, ref) < 3e-2
        else:
            torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
            assert rel_err(out, ref) < 1e-2
        if fmt == "int4" and "BLOCK_M" in cfg:  # tiles by PTX or by float32: both exact, the same bits
            on = {**cfg, "INT4_ASM": 1}
            assert quant.int4_asm(qw, on, M) and quant.int4_asm(qw, cfg, M) == (M >= quant.INT4_ASM_MIN_ROWS)
            for xt, bt in ((x, b), (x.half(), b.half())):  # bfloat16 and float16 each by its own code
                plain = quant.quant_linear_triton(xt, qw, bt, {**cfg, "INT4_ASM": 0})
                assert torch.equal(quant.quant_linear_triton(xt, qw, bt, on), plain)
    assert torch.equal(quant.quant_linear_triton(x, qw, b), quant.quant_linear_triton(x, qw, b, default))


@gpu
@pytest.mark.parametrize("T", [1, 7, 64, 300])
@pytest.mark.parametrize("E,K", [(8, 2), (64, 6)])
@pytest.mark.parametrize(
    "fmt,group", [("bf16", 128), ("int8", 128), ("int4", 32), ("int4", 64), ("fp8", 128)]
)
@pytest.mark.parametrize("path", ["sorted", "gemv"])
def test_fused_moe_kernel(T, E, K, fmt, group, path):
    gen = torch.Generator(CUDA).manual_seed(T + E + group)
    H, inter = (640, 384) if fmt == "int4" else (520, 360)  # not multiples of the default BLOCK_N/K
    x = torch.randn(T, H, generator=gen, device=CUDA).bfloat16()
    w13, w2 = moe_weights(E, H, inter, fmt, group, gen, CUDA)
    ids = torch.stack([torch.randperm(E, generator=gen, device=CUDA)[:K] for _ in range(T)]).int()
    ids[0, 0] = -1
    weights = torch.rand(T, K, generator=gen, device=CUDA)
    config_of = moe_gemv.fused_moe_gemv_config if path == "gemv" else moe.fused_moe_config
    default = config_of(T, E, inter, fmt, group)
    ref = moe.fused_moe_reference(x.float(), w13, w2, ids, weights)
    # int4 / int8 GEMV: integer dot products (DP4A) and the float path, whichever is the default
    dot4 = path == "gemv" and fmt in ("int4", "int8")
    for cfg in [default] + ([{**default, "DP4A": 1 - default.get("DP4A", 0)}] if dot4 else []):
        out = moe.fused_moe_triton(x, w13, w2, ids, weights, cfg)
        if path == "gemv" and cfg.get("DP4A"):  # int8-rounded activations: ~1.5% of the output's norm
            assert rel_err(out, ref) < 3e-2
        else:
            torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
            assert rel_err(out, ref) < 2e-2
        if fmt == "int4" and path == "sorted":  # tiles by PTX or by float32: both exact, the same bits
            on = {**cfg, "INT4_ASM": 1}
            assert quant.int4_asm(w13, on, T) and quant.int4_asm(w2, on, T)
            plain = moe.fused_moe_triton(x, w13, w2, ids, weights, {**cfg, "INT4_ASM": 0})
            assert torch.equal(moe.fused_moe_triton(x, w13, w2, ids, weights, on), plain)
    out = moe.fused_moe_triton(x, w13, w2, ids, weights, default)
    if moe_gemv.takes_gemv(T * K, fmt) == (path == "gemv"):  # the path a call without a config takes
        assert torch.equal(moe.fused_moe_triton(x, w13, w2, ids, weights), out)


@gpu
@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 64)])
@pytest.mark.parametrize("T", [1, 4])
def test_packed_moe_reads_host_memory_in_place(fmt, group, T):
    """The GPU computes experts lying in page-locked host memory (zero-copy over PCIe), also replayed in
    a CUDA graph with new routing."""
    from hetero.experts import pin_in_place

    x, ids, weights, views, moe_of = packed_moe_inputs(T, 3, fmt, group, seed=T)
    assert all(pin_in_place(v) for v in views)
    xc, idc, wc = x.to(CUDA, torch.bfloat16), ids.to(CUDA), weights.to(CUDA)
    out = moe_gemv.fused_moe_packed(xc, fmt, *views, group, idc, wc)
    assert rel_err(out.double().cpu(), moe_of(xc.cpu(), ids, weights)) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = moe_gemv.fused_moe_packed(xc, fmt, *views, group, idc, wc)
    # new activations and routing, the same experts
    xc.copy_(torch.randn(T, x.shape[1])), wc.copy_(torch.rand(T, 3)), idc.copy_(ids.roll(1, dims=1))
    graph.replay()
    torch.cuda.synchronize()
    eager = moe_gemv.fused_moe_packed(xc, fmt, *views, group, idc, wc)
    assert rel_err(eager.double().cpu(), moe_of(xc.cpu(), idc.cpu(), wc.cpu())) < 1e-2
    assert torch.equal(static, eager)


@gpu
def test_gather_rows_reads_host_memory():
    """The gather reads rows of page-locked host memory (over PCIe) into device memory, also replayed in
    a CUDA graph with other ids."""
    from gpu_kernels.gather import gather_rows
    from hetero.experts import pin_in_place

    gen = torch.Generator().manual_seed(9)
    src = torch.randint(-(2**31), 2**31 - 1, (12, 70001), generator=gen, dtype=torch.int32)
    assert pin_in_place(src)
    sel = torch.tensor([3, -1, 11, 0], dtype=torch.int32, device=CUDA)
    dst = torch.zeros(4, src.shape[1], dtype=torch.int32, device=CUDA)
    gather_rows(src, sel, dst)
    assert torch.equal(dst[[0, 2, 3]].cpu(), src[[3, 11, 0]]) and not dst[1].any()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gather_rows(src, sel, dst)
    sel.copy_(torch.tensor([7, 5, -1, 2], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(dst[[0, 1, 3]].cpu(), src[[7, 5, 2]]) and torch.equal(dst[2].cpu(), src[11])


@gpu
def test_neighbours_sharing_a_page_pin_and_read_in_place():
    """Two host arrays on one page (neighbours in a file or on the heap): both pin (the driver would
    refuse the second range whole), no CUDA error is left behind, and the GPU reads both in place."""
    from gpu_kernels.gather import gather_rows
    from hetero.experts import pin_in_place

    buf = torch.randint(
        -(2**31), 2**31 - 1, (9, 1000), generator=torch.Generator().manual_seed(3), dtype=torch.int32
    )
    a, b = buf[:4], buf[4:]  # 16 KB and 20 KB, the page at 16 KB shared unless aligned there
    assert pin_in_place(a) and pin_in_place(b)
    torch.ones(1, device=CUDA).add_(1)  # a kernel launch: would raise a pending registration error
    for src in (a, b):
        dst = torch.zeros(src.shape, dtype=torch.int32, device=CUDA)
        gather_rows(src, torch.arange(src.shape[0], dtype=torch.int32, device=CUDA), dst)
        assert torch.equal(dst.cpu(), src)


@gpu
@pytest.mark.parametrize("T", [1, 32])
def test_fused_moe_graph_replay(T):
    """Both paths capture into a CUDA graph (T = 1 takes the GEMV path, 32 the sorted one): new ids and
    inputs copied in give the reference's answer."""
    gen = torch.Generator(CUDA).manual_seed(T)
    E, K, H, inter = 16, 6, 512, 256
    w13, w2 = moe_weights(E, H, inter, "int8", 128, gen, CUDA)

    def inputs():
        ids = torch.randint(-1, E, (T, K), generator=gen, device=CUDA, dtype=torch.int32)
        return (
            torch.randn(T, H, generator=gen, device=CUDA).bfloat16(),
            ids,
            torch.rand(T, K, generator=gen, device=CUDA),
        )

    static = inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe.fused_moe_triton(static[0], w13, w2, *static[1:])  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.fused_moe_triton(static[0], w13, w2, *static[1:])
    fresh = inputs()
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    ref = moe.fused_moe_reference(fresh[0].float(), w13, w2, *fresh[1:])
    assert moe_gemv.takes_gemv(T * K, "int8") == (T == 1)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def check_unpack_int4(sym: bool, group: int, device: str = "cuda") -> None:
    """The CPU kernels' int4 layout unpacked by the kernel (one launch, both projections) equals the
    torch unpacking, exactly in float32."""
    import numpy as np

    import cpu_kernels
    from gpu_kernels.unpack import unpack_int4
    from hetero.experts import _as_torch, unpack_experts

    rng = np.random.default_rng(group + sym)
    e, h, i = 3, 200, 96  # widths that are not multiples of 128: padding columns are dropped
    w = [rng.standard_normal((e, *s), dtype=np.float32) for s in ((i, h), (i, h), (h, i))]
    p = cpu_kernels.pack_experts(*w, fmt="int4", group_size=group, symmetric=sym)
    names = ["gate_up", "down", "gate_up_scale", "down_scale", "gate_up_zero", "down_zero"]
    dev = {n: _as_torch(getattr(p, n)).to(device) for n in names}
    gate, up, down = unpack_experts(dev, "int4", group, h, i, sym)
    zeros = None if sym else (dev["gate_up_zero"], dev["down_zero"])
    scales = (dev["gate_up_scale"], dev["down_scale"])
    w13, w2 = unpack_int4(dev["gate_up"], dev["down"], scales, zeros, group, h, i, torch.float32)
    assert torch.equal(w13, torch.cat([gate, up], dim=1)) and torch.equal(w2, down)
    if device != "cpu":  # the interpreter's bf16 rounding is not torch's
        b13, _ = unpack_int4(dev["gate_up"], dev["down"], scales, zeros, group, h, i, torch.bfloat16)
        assert torch.equal(b13, w13.to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_unpack_int4_matches_the_cpu_layout_reference(sym, group):
    check_unpack_int4(sym, group)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
def test_unpack_int4_in_interpreter():
    in_interpreter("check_unpack_int4(False, 32, 'cpu'); t.check_unpack_int4(True, 64, 'cpu')")


def test_saved_configs_merge_and_are_read_back(tmp_path, monkeypatch):
    from gpu_kernels import tuning

    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    tuning._load.cache_clear()
    try:
        tuning.save_configs("k", {"card": {"E=4": {1: {"BLOCK_N": 32}, 16: {"BLOCK_N": 64}}}})
        tuning.save_configs("k", {"card": {"E=4": {"16": {"BLOCK_N": 128}}, "E=8": {"1": {"BLOCK_N": 16}}}})
        default = {"BLOCK_N": 8, "num_warps": 4}
        assert tuning.get_config("k", "E=4", 1, default, "card") == {"BLOCK_N": 32, "num_warps": 4}
        assert tuning.get_config("k", "E=4", 20, default, "card")["BLOCK_N"] == 128  # replaced
        assert tuning.get_config("k", "E=8", 1, default, "card")["BLOCK_N"] == 16  # added
        assert tuning.get_config("k", "E=8", 1, default, "other card") == default
        tuning.save_configs("m", {"card": {"E=4,N=8,fmt=int4": {1: {"BLOCK_N": 32}}}})
        assert tuning.get_config("m", "E=16,N=8,fmt=int4", 1, default, "card")["BLOCK_N"] == 32
        assert tuning.get_config("m", "E=16,N=8,fmt=int8", 1, default, "card") == default  # not the format
    finally:
        tuning._load.cache_clear()


# ---------------------------------------------------------------- router expert selection

SELECT_CASES = {  # name: (E, with a score-correction bias, select_experts keywords)
    "v2-lite": (64, False, dict(top_k=6, scoring="softmax", method="greedy")),
    "v2": (
        160,
        False,
        dict(top_k=6, scoring="softmax", method="group_limited_greedy", n_group=8, topk_group=3, scale=16.0),
    ),
    "v3": (
        256,
        True,
        dict(
            top_k=8,
            scoring="sigmoid",
            method="noaux_tc",
            n_group=8,
            topk_group=4,
            renorm=True,
            renorm_eps=1e-20,
            scale=2.5,
        ),
    ),
    "qwen3": (128, False, dict(top_k=8, scoring="softmax", method="greedy", renorm=True)),
    "mixtral": (8, False, dict(top_k=2, scoring="softmax", method="greedy", renorm=True)),
}


def by_id(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, K], weights [T, K] -> each row's ids in ascending order, its weights moved alongside."""
    ids, order = ids.sort(dim=1)
    return ids, weights.gather(1, order)


def check_select_experts(case: str, T: int, device: str = "cpu") -> None:
    """select_experts_triton against the reference on random logits: the same experts in every row
    (in any order) with the same weights. On CPU tensors it needs TRITON_INTERPRET=1."""
    E, with_bias, kw = SELECT_CASES[case]
    gen = torch.Generator(device).manual_seed(1000 * T + E)
    logits = torch.randn(T, E, generator=gen, device=device) * 3
    bias = torch.randn(E, generator=gen, device=device) * 0.1 if with_bias else None
    ids, weights = router.select_experts_triton(logits, bias, **kw)
    assert ids.shape == weights.shape == (T, kw["top_k"])
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    ids, weights = by_id(ids, weights)
    ref_ids, ref_weights = by_id(*gk.select_experts_reference(logits, bias, **kw))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
@pytest.mark.parametrize("case", ["v2", "v3"])
def test_select_experts_kernel_in_interpreter(case):
    in_interpreter(f"check_select_experts({case!r}, 3)")


@gpu
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("case", sorted(SELECT_CASES))
def test_select_experts_kernel(case, T):
    check_select_experts(case, T, CUDA)


def check_absorb(T: int, device: str = "cpu") -> None:
    """absorb_triton against float64 products: MLA's two absorbed projections through strided views of
    one kv_b weight, V2-Lite's head sizes and odd ones. On CPU tensors it needs TRITON_INTERPRET=1."""
    from gpu_kernels import mla_attention as mla

    gen = torch.Generator(device).manual_seed(T)
    for H, nope, v, R in ((16, 128, 128, 512), (3, 24, 40, 72)):
        kvb = torch.randn(H, nope + v, R, generator=gen, device=device).to(torch.bfloat16)
        w_uk, w_uv = kvb[:, :nope], kvb[:, nope:]
        q = torch.randn(T, H, nope + 8, generator=gen, device=device).to(torch.bfloat16)[..., :nope]
        o_latent = torch.randn(T, H, R, generator=gen, device=device).to(torch.bfloat16)
        for x, w, contract in ((q, w_uk, 0), (o_latent, w_uv, 1)):
            got = mla.absorb_triton(x, w, contract)
            want = mla.absorb_reference(x.double(), w.double(), contract)
            assert got.dtype == x.dtype and got.shape == want.shape
            torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
def test_absorb_kernel_in_interpreter():
    in_interpreter("check_absorb(2)")


@gpu
@pytest.mark.parametrize("T", [1, 4, 16])
def test_absorb_kernel(T):
    check_absorb(T, CUDA)


def check_route_experts(case: str, T: int, float_logits: bool, device: str = "cpu", H: int = 300) -> None:
    """route_experts_triton (one kernel: logits, then the last program of a row chooses) against the
    reference logits and select_experts_reference: the same experts in every row, weights within
    float32 sums' rounding; the counters are back to zero after. float_logits: random hidden states
    and weights; else (logits rounded to bf16, where one unit of rounding moves a softmax weight by
    percents) logits that every order of summation gives exactly, each row's in an order of its own.
    H: not a multiple of the kernel's block; over 2048, rows read in several blocks. On CPU tensors
    it needs TRITON_INTERPRET=1."""
    E, with_bias, kw = SELECT_CASES[case]
    gen = torch.Generator(device).manual_seed(7 * T + E)
    x = torch.randn(T, H, generator=gen, device=device).to(torch.bfloat16)
    weight = torch.randn(E, H, generator=gen, device=device) * 0.2
    if not float_logits:  # logit (t, e) = 1 + sign_t * rank_t(e) / 128 (E <= 128): exact in bf16
        ranks = torch.randperm(E, generator=gen, device=device).float() / 128
        weight.zero_()
        weight[:, 0], weight[:, 1] = 1.0, ranks
        x[:, 0], x[:, 1] = 1.0, torch.tensor([(-1.0) ** t for t in range(T)], device=device)
    bias = torch.randn(E, generator=gen, device=device) * 0.1 if with_bias else None
    for _ in range(2):  # a second launch finds its counters reset
        ids, weights = router.route_experts_triton(x, weight, bias, float_logits=float_logits, **kw)
        assert ids.shape == weights.shape == (T, kw["top_k"])
        assert ids.dtype == torch.int64 and weights.dtype == torch.float32
        logits = router.router_logits_reference(x.cpu(), weight.cpu(), float_logits)
        ref_bias = bias.cpu() if bias is not None else None
        ref_ids, ref_weights = by_id(*gk.select_experts_reference(logits, ref_bias, **kw))
        got_ids, got_weights = by_id(ids.cpu(), weights.cpu())
        assert torch.equal(got_ids, ref_ids)
        torch.testing.assert_close(got_weights, ref_weights, rtol=1e-4, atol=1e-5)
    assert not router._COUNTS[x.device].any()


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
@pytest.mark.parametrize("case,float_logits,H", [("v3", True, 2500), ("qwen3", False, 300)])
def test_route_experts_kernel_in_interpreter(case, float_logits, H):
    in_interpreter(f"check_route_experts({case!r}, 3, {float_logits}, H={H})")


@gpu
@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("case", sorted(SELECT_CASES))
@pytest.mark.parametrize("H", [300, 7168])
def test_route_experts_kernel(case, T, H):
    check_route_experts(case, T, case in ("v2-lite", "v2", "v3"), CUDA, H)


@pytest.mark.parametrize("preset", FAMILIES)
def test_router_matches_a_per_row_selection(preset):
    """Router on a tiny spec of each family against the routing rules applied one row at a time."""
    from hetero.config import ModelSpec
    from hetero.make_model import tiny_config
    from hetero.moe import Router

    s = ModelSpec.from_dict(tiny_config(preset))
    E, K, T = s.num_experts, s.top_k, 9
    gen = torch.Generator().manual_seed(len(preset))
    gate = Router(s)
    bias = torch.zeros(E)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(E, s.hidden_size, generator=gen) * 0.3)
        if s.topk_method == "noaux_tc":
            bias = torch.randn(E, generator=gen) * 0.1
            gate.e_score_correction_bias.copy_(bias)
    x = torch.randn(T, s.hidden_size, generator=gen)
    ids, weights = gate(x)
    assert ids.shape == weights.shape == (T, K)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32

    groups = s.n_group if s.topk_method != "greedy" else 1
    size = E // groups
    logits = x @ gate.weight.detach().T  # [T, E]
    for t in range(T):
        scores = logits[t].sigmoid() if s.scoring_func == "sigmoid" else logits[t].softmax(-1)
        choice = (scores + bias).tolist()
        if s.topk_method == "noaux_tc":
            group_score = [sum(sorted(choice[g * size : (g + 1) * size])[-2:]) for g in range(groups)]
        else:
            group_score = [max(choice[g * size : (g + 1) * size]) for g in range(groups)]
        kept = sorted(range(groups), key=lambda g: -group_score[g])[: min(s.topk_group, groups)]
        allowed = [e for e in range(E) if e // size in kept]
        want = sorted(allowed, key=lambda e: -choice[e])[:K]
        w = scores[want]
        if s.norm_topk_prob:
            w = w / w.sum()
        w = w * s.routed_scaling_factor
        got = dict(zip(ids[t].tolist(), weights[t].tolist()))
        assert sorted(got) == sorted(want), (t, got, want)
        assert [got[e] for e in want] == pytest.approx(w.tolist(), rel=1e-5)
        assert len({e // size for e in got}) <= len(kept)
        if s.norm_topk_prob:
            assert sum(got.values()) == pytest.approx(s.routed_scaling_factor, rel=1e-5)
