"""Row dot products written in LLVM IR, called from Numba kernels as intrinsics.

Plain Numba loops vectorize to AVX-512 FMA but never to ``vpdpbusd``, and they
spill accumulators, so the bandwidth-bound inner loops are written here with
explicit vector types and several accumulators kept in registers.

Every intrinsic reads one weight row and one activation row through
``(array, flat element offset)`` pairs; the caller guarantees the offsets and
lengths stay inside the arrays (the Numba wrapper checks shapes once).

Both quantized dots accumulate int32 per vector (one vpdpbusd per 64 inputs) and convert
each vector once. int8 scales and sums in float64: its unsigned codes carry a +128 offset
whose correction cancels most of the sum, so float32 would lose the last bits of the
result and, through the intermediate's requantization, agreement with a float64 reference.
int4 scales and sums in float32 (codes 0..15 cancel far less; relative rounding near 1e-7).

Activation layout shared by the quantized dots (n = padded input length):
  a  int8    [n]        activations, quantized per block of 64
  sa float32 [n // 64]  one scale per block of 64
  aq float32 [n // 32]  sa * sum of a per 32 inputs (int4 zero-point term)
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
    """Sum of all lanes of the vectors (same type): vector adds, then a halving tree (no serial lane chain)."""
    acc = vecs[0]
    for v in vecs[1:]:
        acc = builder.fadd(acc, v)
    n = acc.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(
            acc, ir.Constant(acc.type, ir.Undefined), ir.Constant(ir.VectorType(I32, n), list(range(n)))
        )
        hi = builder.shuffle_vector(
            acc,
            ir.Constant(acc.type, ir.Undefined),
            ir.Constant(ir.VectorType(I32, n), list(range(n, 2 * n))),
        )
        acc = builder.fadd(lo, hi)
    return builder.fadd(zero, builder.extract_element(acc, _c(I32, 0)))


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


def _quarters(builder: ir.IRBuilder, base: ir.Value, blk: ir.Value, g: int, conv) -> ir.Value:
    """Per-group values of one block of 128 inputs spread to its four quarters of 32: <4 x float>."""
    per_blk = 128 // g  # groups per block: 4, 2 or 1
    vty = ir.VectorType(base.type.pointee, per_blk)
    v = conv(_load_vec(builder, base, builder.mul(blk, _c(I64, per_blk)), vty))  # [per_blk] float
    mask = [j * per_blk // 4 for j in range(4)]
    return builder.shuffle_vector(
        v, ir.Constant(v.type, ir.Undefined), ir.Constant(ir.VectorType(I32, 4), mask)
    )


def _quarters16(builder: ir.IRBuilder, base: ir.Value, it: ir.Value, g: int, conv) -> ir.Value:
    """Per-group values of blocks 4it..4it+3 spread to their 16 quarters of 32: <16 x float>."""
    per4 = 4 * (128 // g)  # groups in four blocks: 16, 8 or 4
    vty = ir.VectorType(base.type.pointee, per4)
    v = conv(_load_vec(builder, base, builder.mul(it, _c(I64, per4)), vty))  # [per4] float
    if per4 == 16:
        return v
    mask = ir.Constant(ir.VectorType(I32, 16), [k * per4 // 16 for k in range(16)])
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), mask)


def _make_dot_q4(vnni: bool, g: int, symmetric: bool):
    """Dot of one packed int4 row with int8 activations, per-group scales and zero points; float32.

    w  uint8   packed, block b of 128 inputs is 64 bytes: low nibble = input j, high = input 64 + j
    s  uint16  float16 bits of the group scales, [n / g]
    z  uint8   zero points [n / g] (ignored when symmetric: 8)
    aq float32 [n / 32] sa * sum of the int8 activations per 32 inputs (for the zero-point term)
    Each 64-input half is one vpdpbusd; its int32 lanes are converted once and scaled by
    s_g * sa (lanes 0..7 hold inputs 0..31, lanes 8..15 inputs 32..63, so a group of 32 scales
    half a vector). The zero-point term sum_g s_g * z_g * aq_g is accumulated per block, 4 wide.
    Returns sum_g s_g * sum_{i in g} (q_i - z_g) * sa_i * a_i.
    """

    @intrinsic
    def dot_q4(typingctx, w, w_off, a, a_off, sa, sa_off, s, s_off, z, z_off, aq, aq_off, nblk):
        sig = types.float32(w, w_off, a, a_off, sa, sa_off, s, s_off, z, z_off, aq, aq_off, nblk)

        def codegen(context, builder, sig, args):
            ty = sig.args

            def i64(k):
                return _as_i64(context, builder, args[k], ty[k])

            wp = _ptr(context, builder, ty[0], args[0], i64(1), I8)
            ap = _ptr(context, builder, ty[2], args[2], i64(3), I8)
            sap = _ptr(context, builder, ty[4], args[4], i64(5), F32)
            sp = _ptr(context, builder, ty[6], args[6], i64(7), F16)
            zp = _ptr(context, builder, ty[8], args[8], i64(9), I8)
            aqp = _ptr(context, builder, ty[10], args[10], i64(11), F32)
            n = i64(12)
            mask15 = ir.Constant(V64I8, [15] * 64)
            four = ir.Constant(V64I8, [4] * 64)
            v4f = ir.VectorType(F32, 4)
            eight = ir.Constant(v4f, [8.0] * 4)

            def step(blk, accs):
                p = _load_vec(builder, wp, builder.mul(blk, _c(I64, 64)), V64I8)  # [64] two nibbles
                q = [builder.and_(p, mask15), builder.and_(builder.lshr(p, four), mask15)]  # 2 x [64]
                s4 = _quarters(
                    builder, sp, blk, g, lambda v: builder.fpext(v, ir.VectorType(F32, v.type.count))
                )
                if symmetric:
                    z4 = eight
                else:
                    z4 = _quarters(
                        builder, zp, blk, g, lambda v: builder.uitofp(v, ir.VectorType(F32, v.type.count))
                    )
                sa2 = _load_vec(builder, sap, builder.mul(blk, _c(I64, 2)), ir.VectorType(F32, 2))
                sa4 = builder.shuffle_vector(
                    sa2, ir.Constant(sa2.type, ir.Undefined), ir.Constant(ir.VectorType(I32, 4), [0, 0, 1, 1])
                )
                c4 = builder.fmul(s4, sa4)  # [4] scale of each quarter's int32 lanes
                aq4 = _load_vec(builder, aqp, builder.mul(blk, _c(I64, 4)), v4f)  # [4]
                out = list(accs)
                out[2] = _fmuladd(builder, builder.fmul(s4, z4), aq4, accs[2])
                for half in range(2):
                    av = _load_vec(
                        builder,
                        ap,
                        builder.mul(builder.add(builder.mul(blk, _c(I64, 2)), _c(I64, half)), _c(I64, 64)),
                        V64I8,
                    )
                    d = builder.sitofp(_mac_u8s8(builder, q[half], av, vnni), V16F32)  # [16]
                    lanes = ir.Constant(ir.VectorType(I32, 16), [2 * half] * 8 + [2 * half + 1] * 8)
                    sc = builder.shuffle_vector(c4, ir.Constant(v4f, ir.Undefined), lanes)  # [16]
                    out[half] = _fmuladd(builder, d, sc, accs[half])
                return out

            def step4(it, accs):
                """Blocks 4it..4it+3: scales of all 16 quarters handled as one vector."""
                blk0 = builder.mul(it, _c(I64, 4))
                s16 = _quarters16(
                    builder, sp, it, g, lambda v: builder.fpext(v, ir.VectorType(F32, v.type.count))
                )
                if symmetric:
                    sz16 = builder.fmul(s16, ir.Constant(V16F32, [8.0] * 16))
                else:
                    z16 = _quarters16(
                        builder, zp, it, g, lambda v: builder.uitofp(v, ir.VectorType(F32, v.type.count))
                    )
                    sz16 = builder.fmul(s16, z16)
                sa8 = _load_vec(builder, sap, builder.mul(it, _c(I64, 8)), ir.VectorType(F32, 8))
                sa16 = builder.shuffle_vector(
                    sa8,
                    ir.Constant(sa8.type, ir.Undefined),
                    ir.Constant(ir.VectorType(I32, 16), [k // 2 for k in range(16)]),
                )
                c16 = builder.fmul(s16, sa16)  # [16] scale of each quarter's int32 lanes
                aq16 = _load_vec(builder, aqp, builder.mul(it, _c(I64, 16)), V16F32)
                out = list(accs)
                out[4] = _fmuladd(builder, sz16, aq16, accs[4])
                for b in range(4):
                    blk = builder.add(blk0, _c(I64, b))
                    p = _load_vec(builder, wp, builder.mul(blk, _c(I64, 64)), V64I8)
                    q = [builder.and_(p, mask15), builder.and_(builder.lshr(p, four), mask15)]
                    for half in range(2):
                        k = 2 * b + half  # half index within the 4 blocks
                        aoff = builder.mul(
                            builder.add(builder.mul(blk, _c(I64, 2)), _c(I64, half)), _c(I64, 64)
                        )
                        av = _load_vec(builder, ap, aoff, V64I8)
                        d = builder.sitofp(_mac_u8s8(builder, q[half], av, vnni), V16F32)
                        lanes = ir.Constant(ir.VectorType(I32, 16), [2 * k] * 8 + [2 * k + 1] * 8)
                        sc = builder.shuffle_vector(c16, ir.Constant(V16F32, ir.Undefined), lanes)
                        out[k % 4] = _fmuladd(builder, d, sc, out[k % 4])
                return out

            zero16 = ir.Constant(V16F32, None)
            zero4 = ir.Constant(v4f, None)
            nmain = builder.sdiv(n, _c(I64, 4))
            accs = _counted_loop(builder, _c(I64, 0), nmain, [zero16] * 5, step4)
            tail = _counted_loop(builder, builder.mul(nmain, _c(I64, 4)), n, [zero16, zero16, zero4], step)
            dots = _hsum(builder, [accs[0], accs[1], accs[2], accs[3], tail[0], tail[1]], _c(F32, 0.0))
            corr = builder.fadd(
                _hsum(builder, [accs[4]], _c(F32, 0.0)), _hsum(builder, [tail[2]], _c(F32, 0.0))
            )
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
# int4 dots by group size, symmetric (zero point 8) or not, vpdpbusd or portable
dot_q4_g32 = _make_dot_q4(True, 32, False)
dot_q4_g32s = _make_dot_q4(True, 32, True)
dot_q4_g64 = _make_dot_q4(True, 64, False)
dot_q4_g64s = _make_dot_q4(True, 64, True)
dot_q4_g128 = _make_dot_q4(True, 128, False)
dot_q4_g128s = _make_dot_q4(True, 128, True)
dot_q4_g32_p = _make_dot_q4(False, 32, False)
dot_q4_g32s_p = _make_dot_q4(False, 32, True)
dot_q4_g64_p = _make_dot_q4(False, 64, False)
dot_q4_g64s_p = _make_dot_q4(False, 64, True)
dot_q4_g128_p = _make_dot_q4(False, 128, False)
dot_q4_g128s_p = _make_dot_q4(False, 128, True)


@intrinsic
def fetch_add(typingctx, arr, idx, val):
    """Atomically arr[idx] += val for an int64 array; returns the old value (work-item claiming)."""
    sig = types.int64(arr, idx, val)

    def codegen(context, builder, sig, args):
        ty = sig.args
        p = _ptr(context, builder, ty[0], args[0], _as_i64(context, builder, args[1], ty[1]), I64)
        return builder.atomic_rmw("add", p, _as_i64(context, builder, args[2], ty[2]), "monotonic")

    return sig, codegen
