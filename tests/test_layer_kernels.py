"""The fused kernels of a block's small operations (gpu_kernels.rope: rotary + norms + cache write;
gpu_kernels.norm: residual add + RMSNorm) against their torch references: on the GPU in bf16, and
on CPU tensors in Triton's interpreter; the references against the model's own layers."""

from __future__ import annotations

import pytest
import torch

from gpu_kernels import handoff, norm, rope
from gpu_kernels._triton import HAS_TRITON
from hetero.layers import RMSNorm, Rotary


def _angles(T: int, half: int, gen: torch.Generator, dtype: torch.dtype, device: str):
    pos = torch.randint(0, 4000, (T,), generator=gen)
    freqs = pos.float()[:, None] * (1.0 / 10000 ** (torch.arange(half) / half))[None, :]
    return freqs.cos().to(dtype).to(device), freqs.sin().to(dtype).to(device)


def _slots(T: int, n_slots: int, gen: torch.Generator, device: str) -> torch.Tensor:
    slots = torch.randperm(n_slots, generator=gen)[:T]
    slots[T // 2] = -1  # a token whose cache write is skipped
    return slots.to(device)


def check_mla(T: int, H: int, dtype: torch.dtype, device: str, tol: float) -> None:
    gen = torch.Generator().manual_seed(T * 31 + H)
    R, N, P, bs, nb = 64, 24, 16, 4, 16
    q = torch.randn(T, H, N + P, generator=gen).to(dtype).to(device)
    kv = (torch.randn(T, R + P, generator=gen) * 3).to(dtype).to(device)
    w = (torch.rand(R, generator=gen) + 0.5).to(dtype).to(device)
    cos, sin = _angles(T, P // 2, gen, dtype, device)
    slots = _slots(T, nb * bs, gen, device)
    cache = torch.full((nb, bs, R + P), float("nan"), dtype=dtype, device=device)
    q_ref, cache_ref = q.clone(), cache.clone()
    rope.mla_rope_write_reference(q_ref, kv, cos, sin, w, 1e-6, cache_ref, slots)
    rope.mla_rope_write_triton(q, kv, cos, sin, w, 1e-6, cache, slots)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=tol, atol=tol)
    assert torch.equal(q[..., :N], q_ref[..., :N]), "the no-rope columns must stay untouched"
    torch.testing.assert_close(cache.float(), cache_ref.float(), rtol=tol, atol=tol, equal_nan=True)
    assert cache.isnan().sum() == (nb * bs - (T - 1)) * (R + P), "exactly the kept tokens' slots written"


def check_gqa(T: int, Hq: int, Hkv: int, norm: bool, dtype: torch.dtype, device: str, tol: float) -> None:
    gen = torch.Generator().manual_seed(T * 7 + Hq + norm)
    D, bs, nb = 32, 4, 16
    q, k, v = (torch.randn(T, h, D, generator=gen).to(dtype).to(device) for h in (Hq, Hkv, Hkv))
    qw, kw = ((torch.rand(D, generator=gen) + 0.5).to(dtype).to(device) for _ in range(2))
    norms = (qw, kw) if norm else (None, None)
    cos, sin = _angles(T, D // 2, gen, dtype, device)
    slots = _slots(T, nb * bs, gen, device)
    kc = torch.full((nb, bs, Hkv, D), float("nan"), dtype=dtype, device=device)
    vc = kc.clone()
    q_ref, kc_ref, vc_ref = q.clone(), kc.clone(), vc.clone()
    rope.gqa_rope_write_reference(q_ref, k, v, cos, sin, *norms, 1e-6, kc_ref, vc_ref, slots)
    rope.gqa_rope_write_triton(q, k, v, cos, sin, *norms, 1e-6, kc, vc, slots)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(kc.float(), kc_ref.float(), rtol=tol, atol=tol, equal_nan=True)
    assert torch.equal(vc.nan_to_num(), vc_ref.nan_to_num()), "values are copied exactly"
    assert kc.isnan().sum() == (nb * bs - (T - 1)) * Hkv * D


def check_gqa_partials(
    T: int, Hq: int, Hkv: int, S: int, dtype: torch.dtype, device: str, tol: float, kernel: bool = True
) -> None:
    """q, k and v as a fused product's S float32 partial sums (views of one [S, T, N] tensor, as
    FusedLinear.unsummed gives them): added in order and rounded to q_out's dtype, then as one
    product's q, k and v."""
    gen = torch.Generator().manual_seed(T * 5 + Hq + S)
    D, bs, nb = 32, 4, 16
    sizes = [Hq * D, Hkv * D, Hkv * D]
    parts = torch.randn(S, T, sum(sizes), generator=gen).to(device)
    q, k, v = (p.view(S, T, -1, D) for p in parts.split(sizes, dim=-1))
    qw, kw = ((torch.rand(D, generator=gen) + 0.5).to(dtype).to(device) for _ in range(2))
    cos, sin = _angles(T, D // 2, gen, dtype, device)
    slots = _slots(T, nb * bs, gen, device)
    kc = torch.full((nb, bs, Hkv, D), float("nan"), dtype=dtype, device=device)
    vc, kc_ref, vc_ref = kc.clone(), kc.clone(), kc.clone()
    summed = parts[0].clone()
    for p in parts[1:]:
        summed += p
    q1, k1, v1 = (p.view(T, -1, D) for p in summed.to(dtype).split(sizes, dim=-1))
    q_ref = q1.clone()
    rope.gqa_rope_write_reference(q_ref, k1, v1, cos, sin, qw, kw, 1e-6, kc_ref, vc_ref, slots)
    q_out = torch.full((T, Hq, D), float("nan"), dtype=dtype, device=device)
    write = rope.gqa_rope_write_triton if kernel else rope.gqa_rope_write
    write(q, k, v, cos, sin, qw, kw, 1e-6, kc, vc, slots, q_out)
    torch.testing.assert_close(q_out.float(), q_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(kc.float(), kc_ref.float(), rtol=tol, atol=tol, equal_nan=True)
    assert torch.equal(vc.nan_to_num(), vc_ref.nan_to_num()), "values summed in order, rounded once"
    with torch.no_grad():  # the reference takes the partial sums too
        q_out2, kc2, vc2 = torch.empty_like(q_out), kc_ref.clone().fill_(0), vc_ref.clone().fill_(0)
        rope.gqa_rope_write_reference(q, k, v, cos, sin, qw, kw, 1e-6, kc2, vc2, slots, q_out2)
        assert torch.equal(q_out2, q_ref)


def check_add_norm(T: int, H: int, dtype: torch.dtype, device: str, tol: float) -> None:
    gen = torch.Generator().manual_seed(T + H)
    x, d = ((torch.randn(T, H, generator=gen) * 4).to(dtype).to(device) for _ in range(2))
    w = (torch.rand(H, generator=gen) + 0.5).to(dtype).to(device)
    s, y = norm.add_rms_norm_triton(x, d, w, 1e-6)
    s_ref, y_ref = norm.add_rms_norm_reference(x, d, w, 1e-6)
    assert torch.equal(s, s_ref), "the residual stream is the separate add's, bit for bit"
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)


def check_add_parts_norm(T: int, H: int, dtypes: list, device: str, host_first: bool) -> None:
    """A Parts delta: the residual is x + (the parts' float32 sum rounded to x's dtype), bit for bit
    as the reference; a host part (which the kernel does not take) goes to the reference."""
    gen = torch.Generator().manual_seed(T + H + len(dtypes))
    x = (torch.randn(T, H, generator=gen) * 4).to(torch.bfloat16).to(device)
    w = (torch.rand(H, generator=gen) + 0.5).to(torch.bfloat16).to(device)
    ps = [torch.randn(T, H, generator=gen).to(dt) for dt in dtypes]
    want = sum(p.double() for p in ps).float().to(torch.bfloat16).to(device)
    parts = [p.to(device) for p in ps]
    if host_first:
        parts[0] = ps[0].pin_memory() if device == "cuda" else ps[0]
    delta = norm.Parts(tuple(parts), torch.bfloat16, torch.device(device))
    s, y = norm.add_rms_norm(x, delta, w, 1e-6)
    s_ref, y_ref = norm.add_rms_norm_reference(x, delta, w, 1e-6)
    assert torch.equal(s, s_ref), "the same residual as the reference"
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    # float32 sums of 2-4 parts: at most one bf16 rounding step from the exact sum's rounding
    torch.testing.assert_close(delta.total().float(), want.float(), rtol=1e-2, atol=1e-2)


def check_stacked_parts(T: int, H: int, S: int, dtype: torch.dtype, device: str, kernel: bool) -> None:
    """A split-K product's S float32 partial sums [S, T, H] as one part, beside a plain one: added in
    order with it, rounded to x's dtype, the residual bit for bit as the reference's."""
    gen = torch.Generator().manual_seed(T + H + S)
    x = (torch.randn(T, H, generator=gen) * 4).to(dtype).to(device)
    w = (torch.rand(H, generator=gen) + 0.5).to(dtype).to(device)
    split = torch.randn(S, T, H, generator=gen).to(device)
    plain = torch.randn(T, H, generator=gen).to(dtype).to(device)
    delta = norm.Parts((split, plain), dtype, torch.device(device))
    acc = split[0].clone()
    for p in (*split[1:], plain.float()):
        acc += p
    assert torch.equal(delta.total(), acc.to(dtype)), "slices first, in order, then the next part"
    s, y = (norm.add_parts_rms_norm_triton if kernel else norm.add_rms_norm)(x, delta, w, 1e-6)
    s_ref, y_ref = norm.add_rms_norm_reference(x, delta, w, 1e-6)
    assert torch.equal(s, s_ref), "the same residual as the reference"
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def check_stage_handoff(T: int, H: int, K: int, device: str) -> None:
    gen = torch.Generator().manual_seed(T * H + K)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(device)
    ids = torch.randint(-1, 64, (T, K), generator=gen).to(device)  # int64, -1 = not on the CPU
    w = torch.rand(T, K, generator=gen).to(device)
    pin = device == "cuda"
    # a layer's ids mapped to a backend's own as they are staged: a permutation, -1 kept
    id_map = torch.cat([torch.randperm(64, generator=gen) - 3, torch.tensor([-1])]).to(device)
    for mapped in (None, id_map):
        hx, hw = (torch.full((T + 2, n), float("nan"), pin_memory=pin) for n in (H, K))
        hids = torch.full((T + 2, K), -7, dtype=torch.int32, pin_memory=pin)
        handoff.stage_handoff(x, ids, w, hx, hids, hw, id_map=mapped)
        if pin:
            torch.cuda.synchronize()
        assert torch.equal(hx[:T], x.float().cpu()) and torch.equal(hw[:T], w.cpu())
        want = ids if mapped is None else mapped[ids]
        assert torch.equal(hids[:T], want.int().cpu())
        assert hx[T:].isnan().all() and (hids[T:] == -7).all(), "rows past T untouched"


# ---------------------------------------------------------------- CPU: references and the interpreter


def test_stage_handoff_reference():
    check_stage_handoff(3, 40, 6, "cpu")


def test_add_parts_norm_reference():
    check_add_parts_norm(3, 40, [torch.float32, torch.bfloat16, torch.bfloat16], "cpu", True)
    x = torch.randn(2, 8)
    one = norm.Parts((torch.ones(2, 8), torch.full((2, 8), 2.0)), torch.float32, x.device)
    s, _ = norm.add_rms_norm(x, one, torch.ones(8), 1e-6)
    assert torch.equal(s, x + 3.0)
    check_stacked_parts(3, 40, 5, torch.bfloat16, "cpu", False)


def test_references_are_the_model_layers():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=gen, dtype=torch.float64)
    cos, sin = _angles(5, 8, gen, torch.float64, "cpu")
    for interleaved in (True, False):
        rot = Rotary(16, 10000.0, None, interleaved=interleaved)
        out = rope.rotate_reference(x, cos, sin, interleaved)
        torch.testing.assert_close(rot(x, cos, sin), out)
        # a rotation: each pair keeps its length
        pairs = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, -1)
        torch.testing.assert_close(out[..., :8] ** 2 + out[..., 8:] ** 2, pairs[0] ** 2 + pairs[1] ** 2)
    norm = RMSNorm(16, 1e-6).double()
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    want = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight
    torch.testing.assert_close(norm(x), want)


def test_mla_reference_writes_what_the_model_wrote():
    """[normed latent | rotated k_pe] at the kept slots, q's rope columns rotated, the rest untouched."""
    gen = torch.Generator().manual_seed(1)
    T, H, R, N, P = 3, 2, 8, 4, 4
    q = torch.randn(T, H, N + P, generator=gen, dtype=torch.float64)
    kv = torch.randn(T, R + P, generator=gen, dtype=torch.float64)
    w = torch.rand(R, generator=gen, dtype=torch.float64) + 0.5
    cos, sin = _angles(T, P // 2, gen, torch.float64, "cpu")
    cache = torch.zeros(2, 4, R + P, dtype=torch.float64)
    slots = torch.tensor([5, -1, 0])
    q0 = q.clone()
    rope.mla_rope_write(q, kv, cos, sin, w, 1e-6, cache, slots)
    lat = kv[:, :R] / kv[:, :R].pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    kpe = rope.rotate_reference(kv[:, None, R:], cos, sin, True)[:, 0]
    flat = cache.view(-1, R + P)
    torch.testing.assert_close(flat[5], torch.cat([lat[0], kpe[0]]))
    torch.testing.assert_close(flat[0], torch.cat([lat[2], kpe[2]]))
    assert flat[1:5].abs().sum() == 0 and flat[6:].abs().sum() == 0
    torch.testing.assert_close(q[..., N:], rope.rotate_reference(q0[..., N:], cos, sin, True))
    assert torch.equal(q[..., :N], q0[..., :N])


def check_fetch(shape: tuple, dtype: torch.dtype, src_device: str, device: str) -> None:
    """The fetch kernel copies every word, whatever the tail of the last program."""
    gen = torch.Generator().manual_seed(sum(shape))
    src = torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int32).view(dtype)
    src = src.pin_memory() if src_device == "pinned" else src
    dst = torch.full(shape, 7, dtype=torch.int32, device=device).view(dtype)
    handoff.fetch_into(src, dst)
    assert torch.equal(dst.cpu().view(torch.int32), src.view(torch.int32))


def in_interpreter(call: str) -> None:
    from test_gpu_kernels import in_interpreter as run

    run(call, module="test_layer_kernels")


def check_in_interpreter() -> None:
    """Run with TRITON_INTERPRET=1 (float32: its bf16 rounding is not torch's)."""
    check_mla(5, 3, torch.float32, "cpu", 1e-5)
    check_gqa(5, 6, 2, True, torch.float32, "cpu", 1e-5)
    check_gqa(3, 4, 4, False, torch.float32, "cpu", 1e-5)
    check_gqa_partials(3, 4, 2, 3, torch.float32, "cpu", 1e-5)
    check_add_norm(3, 100, torch.float32, "cpu", 1e-5)
    check_stacked_parts(3, 100, 8, torch.float32, "cpu", True)
    check_stacked_parts(1, 64, 1, torch.float32, "cpu", True)
    for shape in ((1, 2048), (3, 100), (1, 5)):
        check_fetch(shape, torch.float32, "cpu", "cpu")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its CPU interpreter runs the kernels)")
def test_layer_kernels_in_interpreter():
    in_interpreter("check_in_interpreter()")


# ---------------------------------------------------------------- GPU: the kernels in bf16


@pytest.mark.gpu
@pytest.mark.parametrize("T,H", [(1, 16), (7, 128), (33, 16)])
def test_mla_rope_write_kernel(T, H):
    check_mla(T, H, torch.bfloat16, "cuda", 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("T,Hq,Hkv,norm", [(1, 32, 4, True), (9, 16, 16, False), (33, 40, 8, True)])
def test_gqa_rope_write_kernel(T, Hq, Hkv, norm):
    check_gqa(T, Hq, Hkv, norm, torch.bfloat16, "cuda", 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("T,Hq,Hkv,S", [(1, 32, 4, 8), (3, 16, 16, 2)])
def test_gqa_rope_write_kernel_adds_partial_sums(T, Hq, Hkv, S):
    check_gqa_partials(T, Hq, Hkv, S, torch.bfloat16, "cuda", 2e-2)


def test_gqa_rope_write_reference_adds_partial_sums():
    check_gqa_partials(2, 4, 2, 3, torch.bfloat16, "cpu", 2e-2, kernel=False)


@pytest.mark.gpu
@pytest.mark.parametrize("T,H", [(1, 2048), (5, 7168), (40, 100)])
def test_add_rms_norm_kernel(T, H):
    check_add_norm(T, H, torch.bfloat16, "cuda", 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "T,H,K", [(1, 2048, 6), (5, 7168, 8), (16, 100, 2), (600, 2048, 6)]
)  # the last copies
def test_stage_handoff_kernel(T, H, K):
    check_stage_handoff(T, H, K, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "T,H,dtypes",
    [
        (1, 2048, [torch.float32, torch.bfloat16, torch.bfloat16]),
        (5, 7168, [torch.float32, torch.bfloat16]),
        (16, 100, [torch.float32, torch.float32, torch.float16, torch.bfloat16]),
        (3, 2048, [torch.bfloat16]),
    ],
)
@pytest.mark.parametrize("host_first", [False, True])
def test_add_parts_norm_kernel(T, H, dtypes, host_first):
    check_add_parts_norm(T, H, dtypes, "cuda", host_first)
    assert norm._parts_fit(
        torch.zeros(T, H, dtype=torch.bfloat16, device="cuda"),
        norm.Parts(
            tuple(torch.zeros(T, H, device="cuda") for _ in dtypes), torch.bfloat16, torch.device("cuda")
        ),
        torch.zeros(H, dtype=torch.bfloat16, device="cuda"),
    ), "the kernel ran, not the reference"


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,S", [(1, 2048, 8), (4, 7168, 16), (3, 100, 2)])
def test_stacked_parts_norm_kernel(T, H, S):
    check_stacked_parts(T, H, S, torch.bfloat16, "cuda", True)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "int8", "int4"])
@pytest.mark.parametrize("T", [1, 3])
def test_output_projection_leaves_its_partial_sums_to_the_norm(fmt, T):
    """A quantized output projection on the GEMV path with K split hands its partial sums to the
    residual add + norm after it (one launch fewer): the same residual and norm as its summed output
    gives, within one bf16 rounding of the delta (the two add the splits in other orders). Where this
    device's launch settings run the product unsplit (or on the tiled path), its output as it is."""
    from gpu_kernels import QuantLinear
    from gpu_kernels.gemv_tiles import _gemv_split, _tile_k
    from gpu_kernels.quant import quant_linear_config
    from hetero.layers import output_projection

    gen = torch.Generator().manual_seed(T)
    lin = torch.nn.Linear(4096, 2048, bias=False)
    lin.weight.data = torch.randn(2048, 4096, generator=gen) * 0.02
    ql = QuantLinear.from_linear(lin.bfloat16(), fmt).cuda()
    o = torch.randn(T, 4096, generator=gen).bfloat16().cuda()
    x = (torch.randn(T, 2048, generator=gen) * 4).bfloat16().cuda()
    w = (torch.rand(2048, generator=gen) + 0.5).bfloat16().cuda()
    qw = ql.qweight
    cfg = quant_linear_config(T, 2048, 4096, fmt, qw.group_size, qw.blocked)
    split = "BLOCK_M" not in cfg and _gemv_split(4096, _tile_k(cfg["BLOCK_K"], qw.fmt_id, qw.group_size), cfg.get("SPLIT_K", 1))[0] > 1  # fmt: skip
    parts = output_projection(ql, o)
    if not split:
        assert not isinstance(parts, norm.Parts)
        assert torch.equal(parts, ql(o))
        return
    assert isinstance(parts, norm.Parts) and parts.tensors[0].shape[0] > 1, "left unsummed"
    assert norm._parts_fit(x, parts, w), "the kernel adds them, not the reference"
    s, y = norm.add_rms_norm(x, parts, w, 1e-6)
    s_ref, y_ref = norm.add_rms_norm(x, ql(o), w, 1e-6)
    torch.testing.assert_close(s.float(), s_ref.float(), rtol=1e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 2048), (5, 7168), (3, 100)])
def test_fetch_kernel(shape):
    check_fetch(shape, torch.float32, "pinned", "cuda")
    check_fetch(shape, torch.int32, "pinned", "cuda")


@pytest.mark.gpu
def test_fetch_host_in_a_graph_reads_what_the_host_wrote_last(monkeypatch):
    """Captured once, each replay reads the page-locked buffer as the host left it before that replay
    (no line of an earlier read kept), as the decode graphs read each step's CPU result."""
    monkeypatch.setattr(handoff, "FETCH_MAX_BYTES", 1 << 20)
    src = torch.zeros(2, 2048, pin_memory=True)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        handoff.fetch_host(src, torch.device("cuda"))  # compiled outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = handoff.fetch_host(src, torch.device("cuda"))
        total = out.sum()
    for rep in range(4):
        src.copy_(torch.randn(2, 2048, generator=torch.Generator().manual_seed(rep)))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), src) and torch.isclose(total.cpu(), src.sum(), rtol=1e-4)
    monkeypatch.setattr(handoff, "FETCH_MAX_BYTES", 0)  # off: the copy engine, the same numbers
    assert torch.equal(handoff.fetch_host(src, torch.device("cuda")).cpu(), src)


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,K", [(1, 2048, 6), (5, 7168, 8), (16, 100, 2)])
def test_stage_handoff_marks_ready(T, H, K):
    """The kernel's ready flag: the host, polling it while the GPU is still busy before the staging,
    sees the staged rows whole once it is set (no synchronize); every program's count is back to 0."""
    from cpu_kernels.moe import READY_POLLS, wait_ready
    from gpu_kernels.host_flag import host_flags

    flags, counts = host_flags(4), torch.zeros(4, dtype=torch.int32, device="cuda")
    hx, hw = (torch.full((T, n), float("nan"), pin_memory=True) for n in (H, K))
    hids = torch.full((T, K), -7, dtype=torch.int32, pin_memory=True)
    for rep in range(3):
        gen = torch.Generator().manual_seed(rep * 100 + T)
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16).cuda()
        ids = torch.randint(-1, 64, (T, K), generator=gen).cuda()
        w = torch.rand(T, K, generator=gen).cuda()
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time ahead of the staging
        assert handoff.stage_handoff(x, ids, w, hx, hids, hw, ready=(flags, counts, 2))
        assert flags[2] == 0, "set before the GPU got there"
        assert wait_ready(flags.numpy(), 2, READY_POLLS), "the flag never came"
        got = (hx.clone(), hids.clone(), hw.clone())  # before any synchronize
        assert torch.equal(got[0], x.float().cpu()) and torch.equal(got[1], ids.int().cpu())
        assert torch.equal(got[2], w.cpu())
        torch.cuda.synchronize()
        assert flags.tolist() == [0, 0, 0, 0] and counts.tolist() == [0, 0, 0, 0]
    big = torch.zeros(600, 2048, device="cuda")  # copied with torch: no flag
    hbig = torch.zeros(600, 2048, pin_memory=True)
    hid6, hw6 = torch.zeros(600, 6, dtype=torch.int32, pin_memory=True), torch.zeros(600, 6, pin_memory=True)
    ids6, w6 = torch.zeros(600, 6, dtype=torch.long, device="cuda"), torch.zeros(600, 6, device="cuda")
    assert not handoff.stage_handoff(big, ids6, w6, hbig, hid6, hw6, ready=(flags, counts, 0))
