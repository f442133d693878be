"""Row dot products written in LLVM IR, called from Numba kernels as intrinsics.

Plain Numba loops vectorize to AVX-512 FMA but never to ``vpdpbusd``, and they
spill accumulators, so the bandwidth-bound inner loops are written here with
explicit vector types and several accumulators kept in registers.

Every intrinsic reads weight rows and one activation row through
``(array, flat element offset)`` pairs; the caller guarantees the offsets and
lengths stay inside the arrays (the Numba wrapper checks shapes once).

The quantized dots (``dot_q4_rows``, ``dot_q8_rows``) take R = 1, 2 or 4 rows per call and
cost, per 64 weight bytes of each row, the unpack (int4), one vpdpbusd per 64 inputs and one
int32 -> float32 conversion and FMA per vpdpbusd; the activation vectors are loaded once per
block for all R rows, and horizontal sums run once per row. Both accumulate in float32:
int8's +128 code offset and int4's zero points are cancelled exactly in int32 (vpdpbusd's
accumulator starts at minus an offset times the activations' lane sums), so nothing large
cancels in floating point.

Without VNNI (``vnni`` False: AVX2 machines, or a test of the portable path), the codes are
kept small enough for AVX2's byte multiply, vpmaddubsw, whose 16-bit pair sums saturate past
32767: int4 nibbles enter as 0..15 (the high ones shifted down), zero points as a code offset
of 16 - z (1..31), and int8 codes as signed bytes through their absolute values, with their
signs moved onto the activations (|a| <= 127). vpmaddwd by ones then sums the pairs into the
lanes vpdpbusd would fill.

Activation layout shared by the quantized dots (n = padded input length):
  a  int8    [n]        activations, quantized per block of 64
  sa float32 [n // 64]  one scale per block of 64
  ac int32   [n // 4]   -128 * sum of a per 4 inputs (vpdpbusd accumulator seed)
Weights are stored as unsigned codes so that ``vpdpbusd`` (u8 x s8) takes
them as its unsigned operand and the signed activations as the other one.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from .cpu_info import cpu_flags, has_avx512_vnni

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32, F64 = ir.HalfType(), ir.FloatType(), ir.DoubleType()
V64I8 = ir.VectorType(I8, 64)
V16I32 = ir.VectorType(I32, 16)
V16F32 = ir.VectorType(F32, 16)
V16I16 = ir.VectorType(I16, 16)

# Emitting vpdpbusd on a CPU without it would fail instruction selection, so
# the fast path falls back to portable IR at code generation time.
_EMIT_VNNI = has_avx512_vnni()
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# Small codes (no VNNI): AVX2's vpmaddubsw + vpmaddwd, else plain widened integer IR.
_EMIT_AVX2 = _X86 and "avx2" in cpu_flags()


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


def _mac_u8s8(
    builder: ir.IRBuilder, w: ir.Value, a: ir.Value, vnni: bool, acc: ir.Value | None = None
) -> ir.Value:
    """acc + <n x u8> . <n x s8> -> <n / 4 x i32> (n = 64 or 32); lane l adds bytes 4l..4l+3, as vpdpbusd does.
    vnni: through vpdpbusd, any codes; else the small codes of _mac_small."""
    if not vnni:
        return _mac_small(builder, w, a, acc)
    if not _EMIT_VNNI:
        return _mac_wide(builder, w, a, acc, signed=False)
    nb = w.type.count
    vi = ir.VectorType(I32, nb // 4)
    fn = _intrin(builder, f"llvm.x86.avx512.vpdpbusd.{nb * 8}", vi, [vi] * 3)
    wv = builder.bitcast(w, vi)
    av = builder.bitcast(a, vi)
    return builder.call(fn, [ir.Constant(vi, None) if acc is None else acc, wv, av])


def _mac_wide(
    builder: ir.IRBuilder, w: ir.Value, a: ir.Value, acc: ir.Value | None, signed: bool
) -> ir.Value:
    """As _mac_u8s8, any byte values (w unsigned, or signed), through products widened to 32 bits."""
    nb = w.type.count
    vi, wide = ir.VectorType(I32, nb // 4), ir.VectorType(I32, nb)
    wx = builder.sext(w, wide) if signed else builder.zext(w, wide)
    prod = builder.mul(wx, builder.sext(a, wide))  # [nb]
    for k in range(4):
        mask = ir.Constant(vi, [4 * lane + k for lane in range(nb // 4)])
        part = builder.shuffle_vector(prod, ir.Constant(wide, ir.Undefined), mask)  # [nb / 4]
        acc = part if acc is None else builder.add(acc, part)
    return acc


def _mac_small(
    builder: ir.IRBuilder, w: ir.Value, a: ir.Value, acc: ir.Value | None, signed: bool = False
) -> ir.Value:
    """As _mac_u8s8 for operands whose byte products fit AVX2's vpmaddubsw (pairs summed in int16,
    saturating past 32767): w unsigned <= 128, or signed (any: its signs move onto a), a in
    [-127, 127]. Each 32 bytes: vpmaddubsw, then vpmaddwd by ones sums the pairs into int32 lanes."""
    if not _EMIT_AVX2:
        return _mac_wide(builder, w, a, acc, signed)
    nb = w.type.count
    v32, v16, v8 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)
    ubs = _intrin(builder, "llvm.x86.avx2.pmadd.ub.sw", v16, [v32, v32])
    wd = _intrin(builder, "llvm.x86.avx2.pmadd.wd", v8, [v16, v16])
    absb = _intrin(builder, "llvm.abs.v32i8", v32, [v32, ir.IntType(1)])
    sgn = _intrin(builder, "llvm.x86.avx2.psign.b", v32, [v32, v32])
    ones = ir.Constant(v16, [1] * 16)
    runs = []
    for base in range(0, nb, 32):
        pick = ir.Constant(ir.VectorType(I32, 32), list(range(base, base + 32)))
        wp, ap = (builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), pick) for v in (w, a))
        if signed:  # |w| (-128 -> 128, right as unsigned) times a with w's sign
            wp, ap = builder.call(absb, [wp, ir.Constant(ir.IntType(1), 0)]), builder.call(sgn, [ap, wp])
        runs.append(builder.call(wd, [builder.call(ubs, [wp, ap]), ones]))
    res = runs[0]
    if len(runs) == 2:
        res = builder.shuffle_vector(runs[0], runs[1], ir.Constant(V16I32, list(range(16))))
    return res if acc is None else builder.add(acc, res)


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


@intrinsic
def bits_to_f32(typingctx, bits):
    """The float32 whose IEEE bits are the low 32 bits of the integer ``bits`` (a register move; no
    round trip through memory, which type-based alias analysis would let the compiler reorder)."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], I32) if bits.bitwidth > 32 else args[0], F32)

    return sig, codegen


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of the float32 ``x`` as an int32 (a register move, as ``bits_to_f32``): no
    view of an array to read them through, whose reference counting a loop would pay each time."""
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return None
    sig = types.int32(x)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], I32)

    return sig, codegen


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (x86: the time-stamp counter, constant rate): timestamps for a
    kernel's trace of where a call's time goes."""
    sig = types.int64()

    def codegen(context, builder, sig, args):
        return builder.call(_intrin(builder, "llvm.readcyclecounter", I64, []), [])

    return sig, codegen


@intrinsic
def fetch_add(typingctx, arr, idx, val):
    """Atomically arr[idx] += val for an int64 array; returns the old value (work-item claiming,
    completion counts). Acquire-release: what this thread wrote before it is visible to a thread
    that sees the new value (x86: one locked add, a full fence, whatever the ordering)."""
    sig = types.int64(arr, idx, val)

    def codegen(context, builder, sig, args):
        ty = sig.args
        p = _ptr(context, builder, ty[0], args[0], _as_i64(context, builder, args[1], ty[1]), I64)
        return builder.atomic_rmw("add", p, _as_i64(context, builder, args[2], ty[2]), "acq_rel")

    return sig, codegen


@intrinsic
def set_flag(typingctx, arr, idx):
    """arr[idx] = 1 for an int32 array (a flag that another agent polls, such as a GPU reading
    page-locked memory): a release store, so everything this thread wrote or saw counted before it
    (fetch_add) is visible first."""
    sig = types.void(arr, idx)

    def codegen(context, builder, sig, args):
        ty = sig.args
        p = _ptr(context, builder, ty[0], args[0], _as_i64(context, builder, args[1], ty[1]), I32)
        builder.store_atomic(_c(I32, 1), p, "release", 4)
        return context.get_dummy_value()

    return sig, codegen


def _spin(builder: ir.IRBuilder, poll, limit: ir.Value | None = None) -> ir.Value:
    """Poll until ``poll()`` gives (value, done) with done set, a pause between polls, at most
    ``limit`` polls (None: no limit); returns the last value."""
    entry = builder.block
    loop = builder.append_basic_block("spin")
    pause = builder.append_basic_block("spin.pause")
    done = builder.append_basic_block("spin.done")
    builder.branch(loop)
    builder.position_at_end(loop)
    n = builder.phi(I64)
    n.add_incoming(_c(I64, 0), entry)
    v, ok = poll()
    if limit is not None:
        ok = builder.or_(ok, builder.icmp_signed(">=", n, limit))
    builder.cbranch(ok, done, pause)
    builder.position_at_end(pause)
    if _X86:
        builder.call(_intrin(builder, "llvm.x86.sse2.pause", ir.VoidType(), []), [])
    n.add_incoming(builder.add(n, _c(I64, 1)), pause)
    builder.branch(loop)
    builder.position_at_end(done)
    return v


@intrinsic
def wait_flag(typingctx, arr, idx, tries):
    """Spin until arr[idx] != 0 (an int32 flag another agent sets, such as a GPU storing into
    page-locked memory), at most ``tries`` polls; returns the flag's value (0: it never came).

    Acquire loads, so what the setter wrote before its release store is visible after."""
    sig = types.int32(arr, idx, tries)

    def codegen(context, builder, sig, args):
        ty = sig.args
        p = _ptr(context, builder, ty[0], args[0], _as_i64(context, builder, args[1], ty[1]), I32)

        def poll():
            v = builder.load_atomic(p, "acquire", 4)
            return v, builder.icmp_signed("!=", v, _c(I32, 0))

        return _spin(builder, poll, _as_i64(context, builder, args[2], ty[2]))

    return sig, codegen


@intrinsic
def wait_at_least(typingctx, arr, idx, n):
    """Spin until arr[idx] >= n (an int64 array that other threads count up with fetch_add); returns it.

    Acquire loads, so what the counting threads wrote before their increments is visible after;
    plain loads keep the line shared while waiting (a locked read would take it from the counters).
    """
    sig = types.int64(arr, idx, n)

    def codegen(context, builder, sig, args):
        ty = sig.args
        p = _ptr(context, builder, ty[0], args[0], _as_i64(context, builder, args[1], ty[1]), I64)
        target = _as_i64(context, builder, args[2], ty[2])

        def poll():
            v = builder.load_atomic(p, "acquire", 8)
            return v, builder.icmp_signed(">=", v, target)

        return _spin(builder, poll)

    return sig, codegen


# ---------------------------------------------------------------- multi-row dots
#
# Decode streams each weight row once, so the dot loops must cost few instructions per weight
# byte. The row dots below take R rows (R = 1, 2 or 4) against one activation vector: each
# activation vector is loaded once per block for all R rows, and the per-row work per 64
# weight bytes is the unpack, the vpdpbusd and one convert + FMA per 16 int32 lanes, whose
# scale is a scalar broadcast from memory. Horizontal sums run once per row at the end.
# R, the group size, symmetry and the vpdpbusd switch are compile-time literals, so one
# intrinsic covers every variant.
#
# Callers pass rows far apart (a quarter of a work item each), not adjacent ones: R adjacent
# rows read side by side are R streams interleaved within a few KB, which hardware prefetchers
# follow poorly (one Zen 4 core: 8 GB/s for four adjacent 1 KB int4 rows against 28 GB/s for
# four far-apart rows, each a long sequential stream; 19 GB/s for one row at a time).

SEG = 32  # blocks of 128 inputs whose combined int4 scales one pre-pass writes to the stack


def _literals(*tys):
    vals = tuple(t.literal_value if isinstance(t, types.Literal) else None for t in tys)
    return None if None in vals else vals


def _vec(n: int, elt: ir.Type = F32) -> ir.VectorType:
    return ir.VectorType(elt, n)


def _spread(builder: ir.IRBuilder, v: ir.Value, m: int) -> ir.Value:
    """<n x T> -> <m x T> (m a multiple of n): element k of the result is element k * n // m."""
    n = v.type.count
    if n == m:
        return v
    mask = ir.Constant(_vec(m, I32), [k * n // m for k in range(m)])
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), mask)


def _row_offsets(
    builder: ir.IRBuilder, off: ir.Value, step: ir.Value, pair: ir.Value, R: int
) -> list[ir.Value]:
    """Start of row r: off + (r % 2) * step + (r // 2) * pair."""
    return [
        builder.add(off, builder.add(builder.mul(step, _c(I64, r % 2)), builder.mul(pair, _c(I64, r // 2))))
        for r in range(R)
    ]


def _stack(builder: ir.IRBuilder, elt: ir.Type, n: int) -> ir.Value:
    """[n x elt] on the stack, cache-line aligned. Not zero-filled as cgutils.alloca_once's are: the
    pre-pass writes what the main loop reads, and a parallel region holding every variant of the
    dots (two sets in the one-region decode) would clear tens of KB on each entry."""
    with builder.goto_entry_block():
        p = builder.alloca(ir.ArrayType(elt, n))
    p.align = 64
    return p


def _imin(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    return builder.select(builder.icmp_signed("<", a, b), a, b)


@intrinsic
def dot_q4_rows(
    typingctx,
    w,
    w_off,
    w_step,
    w_pair,
    a,
    a_off,
    sa,
    sa_off,
    ac,
    ac_off,
    s,
    s_off,
    s_step,
    s_pair,
    z,
    nblk,
    nrows,
    gsize,
    sym,
    vnni,
):
    """Dots of R packed int4 rows with one int8 activation vector: UniTuple(float32, R).

    Row r starts at w_off + (r % 2) * w_step + (r // 2) * w_pair in w (bytes) and at
    s_off + (r % 2) * s_step + (r // 2) * s_pair in s (group scales, float16 bits) and z (zero
    points, ignored when sym: 8): two pairs of rows, each pair usually adjacent rows (gate and
    up) and the pairs far apart, so the rows are read as two long sequential streams. Activations a [n] int8,
    sa [n / 64] float32 scales, ac [n / 4] int32 (-128 * sum of a per 4); n = 128 * nblk.
    nrows, gsize (32 / 64 / 128), sym and vnni must be literals.
    Row r's value: sum_g s_g * sum_{i in g} (q_i - z_g) * sa_i * a_i, float32 accumulation.

    Per segment of SEG blocks, a pre-pass writes each row's combined scale s_g * sa of every
    64-input half (of every 32-input quarter when g = 32) to a stack array; the main loop then
    scales each vpdpbusd result with one broadcast load. Zero points are subtracted exactly in
    int32: every lane of every vpdpbusd result is exactly sum (q - z) * a over its four inputs
    (times 16 or 8, see below), so nothing cancels in float32.
      Symmetric: low nibbles q and high nibbles 16 q (masked in place) enter vpdpbusd, whose
        accumulator starts at -8 and -128 times the activations' lane sums (ac / 16, ac).
      Zero points: the pre-pass also stores each half's (quarter's) code offsets 128 - z (low
        nibbles) and 128 - 8 z (high nibbles, shifted to 8 q), one byte repeated in an int32;
        the main loop adds them with one dword add per vector (no byte carries: each sum lies
        in 8..248) and vpdpbusd's accumulator starts at ac for both halves. With g = 32 each
        half runs as two 256-bit quarters, so every scale and offset is a plain broadcast.
    The high halves' scales carry 1 / 16 (symmetric) or 1 / 8 (zero points), exact in float32.
    Small codes (vnni False): both nibbles as q (0..15), the accumulators seeded with -8 times the
    lane sums (symmetric) or, with code offsets 16 - z (1..31), -16 times them (ac / 8).
    """
    lits = _literals(nrows, gsize, sym, vnni)
    if lits is None:
        return None
    R, g, symv, vn = lits
    if R not in (1, 2, 4) or g not in (32, 64, 128):
        return None
    sig = types.UniTuple(types.float32, R)(
        w,
        w_off,
        w_step,
        w_pair,
        a,
        a_off,
        sa,
        sa_off,
        ac,
        ac_off,
        s,
        s_off,
        s_step,
        s_pair,
        z,
        nblk,
        nrows,
        gsize,
        sym,
        vnni,
    )

    def codegen(context, builder, sig, args):
        ty = sig.args

        def i64(k):
            return _as_i64(context, builder, args[k], ty[k])

        def ptr(k, off, elt):
            return _ptr(context, builder, ty[k], args[k], off, elt)

        wps = [ptr(0, o, I8) for o in _row_offsets(builder, i64(1), i64(2), i64(3), R)]
        sofs = _row_offsets(builder, i64(11), i64(12), i64(13), R)
        sps = [ptr(10, o, F16) for o in sofs]
        zps = None if symv else [ptr(14, o, I8) for o in sofs]
        ap, sap, acp = ptr(4, i64(5), I8), ptr(6, i64(7), F32), ptr(8, i64(9), I32)
        n = i64(15)
        cw = 2 if g == 32 else 1  # combined scales per half
        nq = 2 if cw == 2 and not symv else 1  # vectors per half: 256-bit quarters or 512-bit halves
        nb, nl = 64 // nq, 16 // nq  # bytes, int32 / float lanes per vector
        vb, vi, vf = _vec(nb, I8), _vec(nl, I32), _vec(nl)
        segh = 2 * SEG * cw  # scratch floats per row
        scratch = builder.bitcast(_stack(builder, F32, R * segh), F32.as_pointer())
        zscr = None  # zero points: code offsets, laid out as the scales
        if not symv:
            zscr = builder.bitcast(_stack(builder, I32, R * segh), I32.as_pointer())
        mask15 = ir.Constant(vb, [15] * nb)
        mask_hi = ir.Constant(vb, [240 if symv else 120] * nb)
        # high nibbles enter vpdpbusd as 16 q (in place) or 8 q; small codes (no VNNI): q, shifted down
        hi_mul = 1 if not vn else 16 if symv else 8
        zbase = 128 if vn else 16  # code offsets base - z (x hi_mul for high nibbles): 8..248, or 1..31
        unroll = 2 if R == 1 else 1  # blocks per main-loop iteration (independent FMA chains)

        def prepass(babs, jloc, nbk):
            """Blocks babs..babs+nbk-1 (segment-local jloc..): store combined scales (and code offsets)."""
            m = nbk * 2 * cw  # halves (quarters when g = 32) in these blocks
            ng = nbk * 128 // g  # groups in these blocks
            hib = [(k * 2 * nbk // m) % 2 for k in range(m)]  # 1 for the units of high halves
            sa_m = _spread(builder, _load_vec(builder, sap, builder.mul(babs, _c(I64, 2)), _vec(2 * nbk)), m)
            # high nibbles enter vpdpbusd as 16 q or 8 q: their halves' scales carry 1 / 16 or 1 / 8 (exact)
            sa_m = builder.fmul(sa_m, ir.Constant(_vec(m), [1.0 / hi_mul if b else 1.0 for b in hib]))
            goff = builder.mul(babs, _c(I64, 128 // g))
            uoff = builder.mul(jloc, _c(I64, 2 * cw))
            for r in range(R):
                sv = builder.fpext(_load_vec(builder, sps[r], goff, _vec(ng, F16)), _vec(ng))
                s_m = _spread(builder, sv, m)
                dst = builder.gep(scratch, [builder.add(_c(I64, r * segh), uoff)])
                builder.store(builder.fmul(s_m, sa_m), builder.bitcast(dst, _vec(m).as_pointer()), align=4)
                if symv:
                    continue
                # 128 - z (low halves), 128 - 8 z (high halves), or 16 - z (both), in each byte of an int32
                zv = _spread(
                    builder, builder.zext(_load_vec(builder, zps[r], goff, _vec(ng, I8)), _vec(ng, I32)), m
                )
                per_z = ir.Constant(_vec(m, I32), [hi_mul * 0x01010101 if b else 0x01010101 for b in hib])
                off = builder.sub(ir.Constant(_vec(m, I32), [zbase * 0x01010101] * m), builder.mul(zv, per_z))
                zdst = builder.gep(zscr, [builder.add(_c(I64, r * segh), uoff)])
                builder.store(off, builder.bitcast(zdst, _vec(m, I32).as_pointer()), align=4)
            return []

        def block(babs, jloc, accs, u):
            """One block of 128 inputs for all rows; accs[((r * 2 + h) * nq + k) * unroll + u]."""
            out = list(accs)

            def vec_at(base, per, h, k, vty):  # vector k of half h of this block
                idx = builder.mul(builder.add(builder.mul(babs, _c(I64, 2)), _c(I64, h)), _c(I64, per))
                return _load_vec(
                    builder, base, idx if nq == 1 else builder.add(idx, _c(I64, k * vty.count)), vty
                )

            av = [[vec_at(ap, 64, h, k, vb) for k in range(nq)] for h in range(2)]
            if symv:  # -8 * lane sums of a (low nibbles), -128 * lane sums = 16 * that (high, 16 q)
                acs = [vec_at(acp, 16, h, 0, V16I32) for h in range(2)]
                by16 = ir.Constant(V16I32, [4] * 16)
                seed = [[builder.ashr(acs[0], by16)], [acs[1] if vn else builder.ashr(acs[1], by16)]]
            else:  # -128 * lane sums of a, cancelling the codes' offsets 128 - z, 128 - 8 z (or -16 *: 16 - z)
                seed = [[vec_at(acp, 16, h, k, vi) for k in range(nq)] for h in range(2)]
                if not vn:
                    seed = [[builder.ashr(v, ir.Constant(vi, [3] * nl)) for v in row] for row in seed]
            for r in range(R):
                woff = builder.mul(babs, _c(I64, 64))
                for k in range(nq):
                    p = _load_vec(
                        builder, wps[r], woff if nq == 1 else builder.add(woff, _c(I64, k * nb)), vb
                    )
                    if symv and vn:  # q_lo, 16 * q_hi
                        q = [builder.and_(p, mask15), builder.and_(p, mask_hi)]
                    else:  # q_lo, 8 * q_hi or q_hi (a 16-bit shift: bits crossing bytes are masked off)
                        vw = _vec(nb // 2, I16)
                        p8 = builder.bitcast(
                            builder.lshr(
                                builder.bitcast(p, vw), ir.Constant(vw, [1 if vn else 4] * (nb // 2))
                            ),
                            vb,
                        )
                        q = [builder.and_(p, mask15), builder.and_(p8, mask_hi if vn else mask15)]
                    for h in range(2):
                        idx = builder.add(_c(I64, r * segh + h * cw + k), builder.mul(jloc, _c(I64, 2 * cw)))
                        qh = q[h]
                        if not symv:  # + this half's (quarter's) code offsets
                            zo = _splat(builder, _load(builder, zscr, idx), nl)
                            qh = builder.bitcast(builder.add(builder.bitcast(qh, vi), zo), vb)
                        d = builder.sitofp(_mac_u8s8(builder, qh, av[h][k], vn, seed[h][k]), vf)
                        if cw == 1 or nq == 2:
                            cs = _splat(builder, _load(builder, scratch, idx), nl)
                        else:
                            cs = _spread(builder, _load_vec(builder, scratch, idx, _vec(2)), 16)
                        j = ((r * 2 + h) * nq + k) * unroll + u
                        out[j] = _fmuladd(builder, d, cs, out[j])
            return out

        seg_c = _c(I64, SEG)
        nseg = builder.sdiv(builder.add(n, _c(I64, SEG - 1)), seg_c)
        nacc = R * 2 * nq * unroll

        def segment(k, accs):
            sb = builder.mul(k, seg_c)
            nseg_blk = _imin(builder, builder.sub(n, sb), seg_c)
            nunit = builder.sdiv(nseg_blk, _c(I64, 8))

            def unit(u, _):
                j = builder.mul(u, _c(I64, 8))
                return prepass(builder.add(sb, j), j, 8)

            _counted_loop(builder, _c(I64, 0), nunit, [], unit)
            _counted_loop(
                builder,
                builder.mul(nunit, _c(I64, 8)),
                nseg_blk,
                [],
                lambda j, _: prepass(builder.add(sb, j), j, 1),
            )

            def main(it, acc):
                for u in range(unroll):
                    j = builder.add(builder.mul(it, _c(I64, unroll)), _c(I64, u))
                    acc = block(builder.add(sb, j), j, acc, u)
                return acc

            nmain = builder.sdiv(nseg_blk, _c(I64, unroll))
            accs = _counted_loop(builder, _c(I64, 0), nmain, accs, main)
            if unroll > 1:
                accs = _counted_loop(
                    builder, builder.mul(nmain, _c(I64, unroll)), nseg_blk, accs,
                    lambda j, acc: block(builder.add(sb, j), j, acc, 0),
                )  # fmt: skip
            return list(accs)

        vals = _counted_loop(builder, _c(I64, 0), nseg, [ir.Constant(vf, None)] * nacc, segment)
        per = 2 * nq * unroll
        res = [_hsum(builder, vals[r * per : (r + 1) * per], _c(F32, 0.0)) for r in range(R)]
        return context.make_tuple(builder, sig.return_type, res)

    return sig, codegen


@intrinsic
def dot_q8_rows(typingctx, w, w_off, w_step, w_pair, a, a_off, sa, sa_off, ac, ac_off, nblk, nrows, vnni):
    """Dots of R int8 rows (codes q + 128) with one int8 activation vector: UniTuple(float32, R).

    Row r: codes w[w_off + (r % 2) * w_step + (r // 2) * w_pair:], n = 64 * nblk. Activations a [n] int8, sa [n / 64]
    float32 scales, ac [n / 4] int32: -128 * the sum of a over each 4 inputs, which seeds
    vpdpbusd's accumulator so each block's int32 lanes are exactly sum (code - 128) * a (no
    large offset to cancel later, so float32 accumulation keeps its relative precision).
    Row r's value: sum_b sa[b] * sum_{i in b} (w_i - 128) * a_i. nrows and vnni are literals.
    """
    lits = _literals(nrows, vnni)
    if lits is None:
        return None
    R, vn = lits
    if R not in (1, 2, 4):
        return None
    sig = types.UniTuple(types.float32, R)(
        w, w_off, w_step, w_pair, a, a_off, sa, sa_off, ac, ac_off, nblk, nrows, vnni
    )

    def codegen(context, builder, sig, args):
        ty = sig.args

        def i64(k):
            return _as_i64(context, builder, args[k], ty[k])

        offs = _row_offsets(builder, i64(1), i64(2), i64(3), R)
        wps = [_ptr(context, builder, ty[0], args[0], o, I8) for o in offs]
        ap = _ptr(context, builder, ty[4], args[4], i64(5), I8)
        sap = _ptr(context, builder, ty[6], args[6], i64(7), F32)
        acp = _ptr(context, builder, ty[8], args[8], i64(9), I32)
        n = i64(10)
        unroll = 4 // R

        flip = ir.Constant(V64I8, [-128] * 64)

        def block(b, accs, u):
            out = list(accs)
            off = builder.mul(b, _c(I64, 64))
            av = _load_vec(builder, ap, off, V64I8)
            cv = _load_vec(builder, acp, builder.mul(b, _c(I64, 16)), V16I32) if vn else None
            sb = _splat(builder, _load(builder, sap, b), 16)
            for r in range(R):
                wv = _load_vec(builder, wps[r], off, V64I8)
                if vn:  # codes q + 128, the accumulator seeded with -128 * the lane sums of a
                    d = _mac_u8s8(builder, wv, av, vn, cv)
                else:  # codes as signed bytes q (the top bit flipped)
                    d = _mac_small(builder, builder.xor(wv, flip), av, None, signed=True)
                out[r * unroll + u] = _fmuladd(builder, builder.sitofp(d, V16F32), sb, out[r * unroll + u])
            return out

        def main(it, accs):
            for u in range(unroll):
                accs = block(builder.add(builder.mul(it, _c(I64, unroll)), _c(I64, u)), accs, u)
            return accs

        nmain = builder.sdiv(n, _c(I64, unroll))
        accs = _counted_loop(builder, _c(I64, 0), nmain, [ir.Constant(V16F32, None)] * (R * unroll), main)
        if unroll > 1:
            accs = _counted_loop(
                builder, builder.mul(nmain, _c(I64, unroll)), n, accs, lambda b, acc: block(b, acc, 0)
            )
        res = [_hsum(builder, accs[r * unroll : (r + 1) * unroll], _c(F32, 0.0)) for r in range(R)]
        return context.make_tuple(builder, sig.return_type, res)

    return sig, codegen
