"""A Triton kernel's machine code for a GPU that need not be here: compile it for a target (Hopper,
sm_90, by default) with the ptxas and cuobjdump that Triton's wheel ships, then read its registers,
spills and the instruction mix of its main loop.

At small batches a kernel may be bound by the instructions it issues per byte rather than by the
bytes; counting them needs no GPU, so a change can be weighed before it is timed. Pointers are
compiled as Triton specializes them at run time (16-byte aligned): without that the loads do not
vectorize and the code is not what runs.
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MachineCode:
    """What ptxas made of one kernel for one target."""

    ptx: str
    sass: str
    registers: int
    spill_bytes: int  # stores and loads to local memory, as ptxas reports them
    shared_bytes: int
    loop: int  # instructions in the longest loop (a backward branch's span); 0 if none
    loop_mix: collections.Counter = field(default_factory=collections.Counter)  # its opcodes
    instructions: int = 0  # in the whole kernel (a program without loops runs each once at most)


def compile_for(
    kernel, const: dict, types: dict, arch: int = 90, aligned: bool = True, **options
) -> MachineCode:
    """Compile a @triton.jit kernel for sm_<arch>, no GPU needed.

    const: its constexprs (those with defaults may be left out); types: every pointer's type ("*bf16",
    "*i8", ...) and any scalar's that is not int32; options: num_warps, num_stages. aligned: pointers
    and the int32 scalars named in ``options.pop("aligned_ints", ())`` are specialized as 16-divisible,
    as at a real launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    aligned_ints = set(options.pop("aligned_ints", ()))
    names = kernel.arg_names
    # constexprs left out take their defaults, as at a launch
    const = {**{q.name: q.default for q in kernel.params if q.is_constexpr and q.has_default}, **const}
    unknown = (set(const) | set(types) | aligned_ints) - set(names)
    assert not unknown, f"not arguments of {kernel.fn.__name__}: {sorted(unknown)}"
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    untyped = [n for n in names if n.endswith("_ptr") and n not in types]
    assert not untyped, f"pointers without a type: {untyped}"
    attrs = {}
    if aligned:
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, n in enumerate(names)
            if sig[n].startswith("*") or n in aligned_ints
        }
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)  # fmt: skip
    compiled = compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_report(ptx, arch)
    sass = disassemble(compiled.asm["cubin"])
    count, mix = longest_loop(sass)
    total = sum(1 for line in sass.splitlines() if _INSTR.match(line))
    return MachineCode(ptx, sass, regs, spills, compiled.metadata.shared, count, mix, total)


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                f"--gpu-name=sm_{arch}{suffix}",
                str(src),
                "-o",
                str(Path(d) / "k.o"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", run.stderr)]
    return int(regs.group(1)) if regs else 0, sum(spills)


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin (cuobjdump -sass)."""
    import triton.knobs

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-sass", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BACK = re.compile(r"BRA (0x[0-9a-f]+)")


def longest_loop(sass: str) -> tuple[int, collections.Counter]:
    """(instructions, opcode counts) between the target and the source of the backward branch that
    spans the most code: a kernel's main loop, its body once (software pipelining included)."""
    instrs = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, sass.splitlines()) if m]
    best = None
    for addr, text in instrs:
        m = _BACK.search(text)
        if (
            m
            and int(m.group(1), 16) < addr
            and (best is None or addr - int(m.group(1), 16) > best[1] - best[0])
        ):
            best = (int(m.group(1), 16), addr)
    if best is None:
        return 0, collections.Counter()
    body = [text for addr, text in instrs if best[0] <= addr <= best[1]]
    # opcode without predicate: "@!P0 LDG.E.128 R4, ..." -> "LDG.E.128"
    ops = collections.Counter(re.sub(r"^@!?U?P[T0-9]+\s+", "", t).split()[0] for t in body)
    return len(body), ops
