"""Row dot products written in LLVM IR, called from Numba kernels as intrinsics.

Plain Numba loops vectorize to AVX-512 FMA but never to ``vpdpbusd``, and they
spill accumulators, so the bandwidth-bound inner loops are written here with
explicit vector types and several accumulators kept in registers.

Every intrinsic reads one weight row and one activation row through
``(array, flat element offset)`` pairs; the caller guarantees the offsets and
lengths stay inside the arrays (the Numba wrapper checks shapes once).

Quantized dots return float64: the integer products are exact and the scale
combination in float64 is exact up to the last bit, which keeps the kernel
reproducible by a numpy reference (rounding the intermediate activation
before its own quantization then agrees bit for bit).

Activation layout shared by the quantized dots (n = padded input length):
  a  int8    [n]        activations, quantized per block of 64
  sa float32 [n // 64]  one scale per block of 64
Weights are stored as unsigned codes so that ``vpdpbusd`` (u8 x s8) takes
them as its unsigned operand and the signed activations as the other one.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .cpu_info import has_avx512_vnni

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32, F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()
V64I8 = ir.VectorType(I8, 64)
V16I32 = ir.VectorType(I32, 16)
V8F64 = ir.VectorType(F64, 8)
V16F32 = ir.VectorType(F32, 16)
V16I16 = ir.VectorType(I16, 16)

# Emitting vpdpbusd on a CPU without it would fail instruction selection, so
# the fast path falls back to portable IR at code generation time.
_EMIT_VNNI = has_avx512_vnni()


def _c(ty: ir.Type, v: int | float) -> ir.Constant:
    return ir.Constant(ty, v)


def _splat(builder: ir.IRBuilder, x: ir.Value, n: int) -> ir.Value:
    vty = ir.VectorType(x.type, n)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), x, _c(I32, 0))
    return builder.shuffle_vector(
        v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(I32, n), [0] * n)
    )


def _ptr(context, builder, aty, arr, off, elt: ir.Type) -> ir.Value:
    data = context.make_array(aty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [off]), elt.as_pointer())


def _load_vec(builder: ir.IRBuilder, base: ir.Value, idx: ir.Value, vty: ir.VectorType) -> ir.Value:
    p = builder.bitcast(builder.gep(base, [idx]), vty.as_pointer())
    return builder.load(p, align=1)


def _load(builder: ir.IRBuilder, base: ir.Value, idx: ir.Value) -> ir.Value:
    return builder.load(builder.gep(base, [idx]))


def _intrin(builder: ir.IRBuilder, name: str, ret: ir.Type, argtys: list[ir.Type]) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, argtys), name)


def _fmuladd(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    suffix = "f64" if isinstance(a.type.element, ir.DoubleType) else "f32"
    name = f"llvm.fmuladd.v{a.type.count}{suffix}"
    fn = _intrin(builder, name, a.type, [a.type] * 3)
    return builder.call(fn, [a, b, c])


def _mac_u8s8(builder: ir.IRBuilder, w: ir.Value, a: ir.Value, vnni: bool) -> ir.Value:
    """<64 x u8> . <64 x s8> -> <16 x i32>; lane l sums bytes 4l..4l+3, as vpdpbusd does."""
    if vnni and _EMIT_VNNI:
        fn = _intrin(builder, "llvm.x86.avx512.vpdpbusd.512", V16I32, [V16I32] * 3)
        wv = builder.bitcast(w, V16I32)
        av = builder.bitcast(a, V16I32)
        return builder.call(fn, [ir.Constant(V16I32, None), wv, av])
    v64i32 = ir.VectorType(I32, 64)
    prod = builder.mul(builder.zext(w, v64i32), builder.sext(a, v64i32))  # [64]
    acc = None
    for k in range(4):
        mask = ir.Constant(ir.VectorType(I32, 16), [4 * lane + k for lane in range(16)])
        part = builder.shuffle_vector(prod, ir.Constant(v64i32, ir.Undefined), mask)  # [16]
        acc = part if acc is None else builder.add(acc, part)
    return acc


def _half_to_f64(builder: ir.IRBuilder, v: ir.Value, hi: bool) -> ir.Value:
    """Lanes 0..7 (or 8..15) of a <16 x i32> as <8 x double>."""
    start = 8 if hi else 0
    mask = ir.Constant(ir.VectorType(I32, 8), list(range(start, start + 8)))
    part = builder.shuffle_vector(v, ir.Constant(V16I32, ir.Undefined), mask)
    return builder.sitofp(part, V8F64)


def _folded_f64(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Lanes l and l + 8 of a <16 x i32> added, as <8 x double>: one conversion where both halves share a scale."""
    lo = builder.shuffle_vector(
        v, ir.Constant(V16I32, ir.Undefined), ir.Constant(ir.VectorType(I32, 8), list(range(8)))
    )
    hi = builder.shuffle_vector(
        v, ir.Constant(V16I32, ir.Undefined), ir.Constant(ir.VectorType(I32, 8), list(range(8, 16)))
    )
    return builder.sitofp(builder.add(lo, hi), V8F64)


def _hsum(builder: ir.IRBuilder, vecs: list[ir.Value], zero: ir.Value) -> ir.Value:
    acc = vecs[0]
    for v in vecs[1:]:
        acc = builder.fadd(acc, v)
    total = zero
    for lane in range(acc.type.count):
        total = builder.fadd(total, builder.extract_element(acc, _c(I32, lane)))
    return total


def _counted_loop(builder: ir.IRBuilder, start: ir.Value, stop: ir.Value, inits: list[ir.Value], body):
    """for i in range(start, stop): vals = body(i, vals); returns the final vals."""
    pre = builder.block
    header = builder.append_basic_block("loop.header")
    bodyb = builder.append_basic_block("loop.body")
    done = builder.append_basic_block("loop.done")
    builder.branch(header)
    builder.position_at_end(header)
    i = builder.phi(I64)
    i.add_incoming(start, pre)
    phis = []
    for v in inits:
        p = builder.phi(v.type)
        p.add_incoming(v, pre)
        phis.append(p)
    builder.cbranch(builder.icmp_signed("<", i, stop), bodyb, done)
    builder.position_at_end(bodyb)
    new = body(i, phis)
    end = builder.block
    i.add_incoming(builder.add(i, _c(I64, 1)), end)
    for p, v in zip(phis, new, strict=True):
        p.add_incoming(v, end)
    builder.branch(header)
    builder.position_at_end(done)
    return phis


def _as_i64(context, builder, val, ty):
    return context.cast(builder, val, ty, types.int64)


def _make_dot_q8(vnni: bool):
    """sum_b sa[b] * sum_{i in block b} w[i] * a[i] over nvec blocks of 64 (w unsigned codes)."""

    @intrinsic
    def dot_q8(typingctx, w, w_off, a, a_off, sa, sa_off, nvec):
        sig = types.float64(w, w_off, a, a_off, sa, sa_off, nvec)

        def codegen(context, builder, sig, args):
            ty = sig.args
            wp = _ptr(context, builder, ty[0], args[0], _as_i64(context, builder, args[1], ty[1]), I8)
            ap = _ptr(context, builder, ty[2], args[2], _as_i64(context, builder, args[3], ty[3]), I8)
            sp = _ptr(context, builder, ty[4], args[4], _as_i64(context, builder, args[5], ty[5]), F32)
            n = _as_i64(context, builder, args[6], ty[6])

            def step(blk, accs):
                wv = _load_vec(builder, wp, builder.mul(blk, _c(I64, 64)), V64I8)  # [64] u8
                av = _load_vec(builder, ap, builder.mul(blk, _c(I64, 64)), V64I8)  # [64] s8
                d = _mac_u8s8(builder, wv, av, vnni)  # [16] i32
                s = _splat(builder, builder.fpext(_load(builder, sp, blk), F64), 8)
                return [_fmuladd(builder, _folded_f64(builder, d), s, accs[0])]

            unroll = 4
            zero = ir.Constant(V8F64, None)

            def body4(it, accs):
                out = []
                base = builder.mul(it, _c(I64, unroll))
                for u in range(unroll):
                    out += step(builder.add(base, _c(I64, u)), accs[u : u + 1])
                return out

            nmain = builder.sdiv(n, _c(I64, unroll))
            accs = _counted_loop(builder, _c(I64, 0), nmain, [zero] * unroll, body4)
            tail = _counted_loop(builder, builder.mul(nmain, _c(I64, unroll)), n, [zero], step)
            return _hsum(builder, list(accs) + list(tail), _c(F64, 0.0))

        return sig, codegen

    return dot_q8


def _make_dot_q4(vnni: bool, wide: bool):
    """Dot of one packed int4 row with int8 activations, per-group scales and zero points.

    w  uint8   packed, block b of 128 inputs is 64 bytes: low nibble = input j, high = input 64 + j
    s  uint16  float16 bits of the group scales, [n / g]
    z  uint8   zero points [n / g] read with stride z_stride (0: one shared zero, e.g. 8 = symmetric)
    a32 float64 [n / 32] sum of dequantized activations per 32 inputs (for the zero-point term)
    g = 32 << g_shift, and wide must equal g >= 64 (one conversion per 64 inputs instead of two).
    Returns sum_g s_g * sum_{i in g} (q_i - z_g) * sa_i * a_i.
    """

    @intrinsic
    def dot_q4(
        typingctx, w, w_off, a, a_off, sa, sa_off, s, s_off, z, z_off, z_stride, a32, a32_off, g_shift, nblk
    ):
        sig = types.float64(
            w, w_off, a, a_off, sa, sa_off, s, s_off, z, z_off, z_stride, a32, a32_off, g_shift, nblk
        )

        def codegen(context, builder, sig, args):
            ty = sig.args

            def i64(k):
                return _as_i64(context, builder, args[k], ty[k])

            wp = _ptr(context, builder, ty[0], args[0], i64(1), I8)
            ap = _ptr(context, builder, ty[2], args[2], i64(3), I8)
            sap = _ptr(context, builder, ty[4], args[4], i64(5), F32)
            sp = _ptr(context, builder, ty[6], args[6], i64(7), F16)
            zp = _ptr(context, builder, ty[8], args[8], i64(9), I8)
            zstride = i64(10)
            a32p = _ptr(context, builder, ty[11], args[11], i64(12), F64)
            shift = i64(13)
            n = i64(14)
            ngrp = builder.lshr(_c(I64, 4), shift)  # groups per block of 128
            mask15 = ir.Constant(V64I8, [15] * 64)
            four = ir.Constant(V64I8, [4] * 64)

            def step(blk, accs):
                p = _load_vec(builder, wp, builder.mul(blk, _c(I64, 64)), V64I8)  # [64] two nibbles
                q = [builder.and_(p, mask15), builder.lshr(p, four)]  # 2 x [64] in 0..15
                out = list(accs)
                for half in range(2):
                    ablk = builder.add(builder.mul(blk, _c(I64, 2)), _c(I64, half))
                    av = _load_vec(builder, ap, builder.mul(ablk, _c(I64, 64)), V64I8)  # [64] s8
                    d = _mac_u8s8(builder, q[half], av, vnni)  # [16] i32
                    sa_ = builder.fpext(_load(builder, sap, ablk), F64)
                    if wide:  # g >= 64: the whole 64-input half shares one weight group
                        gi = builder.add(builder.mul(blk, ngrp), builder.lshr(_c(I64, 2 * half), shift))
                        sg = builder.fpext(_load(builder, sp, gi), F64)
                        zg = builder.uitofp(_load(builder, zp, builder.mul(gi, zstride)), F64)
                        scale = _splat(builder, builder.fmul(sg, sa_), 8)
                        out[half] = _fmuladd(builder, _folded_f64(builder, d), scale, out[half])
                        k = builder.add(builder.mul(blk, _c(I64, 4)), _c(I64, 2 * half))
                        a64 = builder.fadd(
                            _load(builder, a32p, k), _load(builder, a32p, builder.add(k, _c(I64, 1)))
                        )
                        out[4 + half] = builder.fadd(out[4 + half], builder.fmul(builder.fmul(sg, zg), a64))
                        continue
                    for quarter in range(2):
                        j = 2 * half + quarter
                        gi = builder.add(builder.mul(blk, ngrp), builder.lshr(_c(I64, j), shift))
                        sg = builder.fpext(_load(builder, sp, gi), F64)
                        zg = builder.uitofp(_load(builder, zp, builder.mul(gi, zstride)), F64)
                        scale = _splat(builder, builder.fmul(sg, sa_), 8)
                        out[j] = _fmuladd(builder, _half_to_f64(builder, d, quarter == 1), scale, out[j])
                        a32 = _load(builder, a32p, builder.add(builder.mul(blk, _c(I64, 4)), _c(I64, j)))
                        out[4 + j] = builder.fadd(out[4 + j], builder.fmul(builder.fmul(sg, zg), a32))
                return out

            inits = [ir.Constant(V8F64, None)] * 4 + [_c(F64, 0.0)] * 4
            accs = _counted_loop(builder, _c(I64, 0), n, inits, step)
            dots = _hsum(builder, list(accs[:4]), _c(F64, 0.0))
            corr = builder.fadd(builder.fadd(accs[4], accs[5]), builder.fadd(accs[6], accs[7]))
            return builder.fsub(dots, corr)

        return sig, codegen

    return dot_q4


@intrinsic
def dot_bf16(typingctx, w, w_off, x, x_off, nvec):
    """sum_i bf16(w[i]) * x[i] over nvec blocks of 64, float32 accumulation; w uint16 bf16 bits."""
    sig = types.float32(w, w_off, x, x_off, nvec)

    def codegen(context, builder, sig, args):
        ty = sig.args
        wp = _ptr(context, builder, ty[0], args[0], _as_i64(context, builder, args[1], ty[1]), I16)
        xp = _ptr(context, builder, ty[2], args[2], _as_i64(context, builder, args[3], ty[3]), F32)
        n = _as_i64(context, builder, args[4], ty[4])
        sixteen = ir.Constant(V16I32, [16] * 16)

        def body(blk, accs):
            out = []
            for u in range(4):
                off = builder.add(builder.mul(blk, _c(I64, 64)), _c(I64, 16 * u))
                wv = _load_vec(builder, wp, off, V16I16)  # [16] bf16 bits
                wf = builder.bitcast(builder.shl(builder.zext(wv, V16I32), sixteen), V16F32)  # [16]
                xv = _load_vec(builder, xp, off, V16F32)  # [16]
                out.append(_fmuladd(builder, wf, xv, accs[u]))
            return out

        accs = _counted_loop(builder, _c(I64, 0), n, [ir.Constant(V16F32, None)] * 4, body)
        return _hsum(builder, list(accs), _c(F32, 0.0))

    return sig, codegen


dot_q8_vnni = _make_dot_q8(True)
dot_q8_portable = _make_dot_q8(False)
dot_q4_vnni = _make_dot_q4(True, False)
dot_q4_portable = _make_dot_q4(False, False)
dot_q4w_vnni = _make_dot_q4(True, True)
dot_q4w_portable = _make_dot_q4(False, True)
