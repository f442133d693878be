"""`hetero convert`: write a checkpoint (HF safetensors or GGUF) in hetero's packed layout.

The output (see ``hetero.packed``) loads by mmap with no quantization or repacking. Conversion
streams one layer at a time, so peak RAM stays near one layer's weights. Each file is written
to a temporary name, hashed, then renamed: a file under its final name is complete, so an
interrupted conversion resumes by skipping those. The manifest (size + sha256 of every file)
is written last and checked against the files once more before the conversion reports success.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file as save_torch
from tqdm import tqdm

from cpu_kernels.formats import FORMATS
from hetero.apply import Placement, open_source
from hetero.config import ModelSpec
from hetero.errors import HeteroError
from hetero.model import Transformer, keep_fp32, named_tensors
from hetero.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PACKED_FIELDS,
    layer_file,
    sha256_file,
    verify_manifest,
)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
_HASH_DIR = ".hashes"  # per-file sha256 written at write time, folded into the manifest at the end


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    experts: str | None = "int4",
    group_size: int = 64,
    progress: bool = True,
) -> Path:
    """Convert ``src`` into ``out``; resumes a conversion of the same options left unfinished there.

    experts: int4 | int8 | bf16; None keeps what a GGUF file's quant types map to.
    """
    source = open_source(src)
    spec = source.spec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = experts or getattr(source, "expert_format", None) or "int4"
    if experts is None and hasattr(source, "group_size"):
        group_size = source.group_size
    placement = Placement(expert_format=fmt, group_size=group_size)
    info = _start(out, src, spec, placement)
    (out / _HASH_DIR).mkdir(exist_ok=True)

    groups = _dense_groups(spec)
    files = ["embed.safetensors", *(layer_file(i) for i in range(spec.num_layers)), "head.safetensors"]
    bar = tqdm(total=len(files), desc=f"convert -> {out}", unit="file", disable=not progress)
    for file in files:
        if not (out / file).is_file():
            tensors = {n: _dense_value(source, spec, n) for n in groups[file]}
            layer = _layer_of(file)
            if layer is not None and layer in spec.moe_layers:
                packed, _ = source.cpu_experts(spec, layer, list(range(spec.num_experts)), placement)
                tensors.update(_packed_tensors(layer, packed))
            _write_atomic(out, file, tensors)
        bar.update()
    bar.close()
    info["layers"] = _layer_formats(out, spec)
    _write_json_atomic(out / "hetero.json", info)
    _finish(out, files)
    return out


def _start(out: Path, src, spec: ModelSpec, p: Placement) -> dict[str, Any]:
    """Write hetero.json and the side files, or check that a resumed conversion asked for the same."""
    experts = {"fmt": p.expert_format, "group_size": p.group_size}
    info_file = out / "hetero.json"
    if info_file.is_file():
        old = json.loads(info_file.read_text())
        if (
            old.get("experts", {}).get("fmt") != p.expert_format
            or old.get("experts", {}).get("group_size") != p.group_size
        ):
            raise HeteroError(
                f"{out} holds a conversion with experts {old.get('experts')}, not {experts}; "
                "pass the same options to resume it, or choose an empty directory"
            )
        if (out / "manifest.json").is_file():
            (out / "manifest.json").unlink()  # finished before: re-verify and rewrite at the end
    groups = _dense_groups(spec)
    info = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "source": str(src),
        "experts": experts,
        "layers": {},
        "weight_map": {n: f for f, names in groups.items() for n in names},
    }
    _write_json_atomic(info_file, info)
    _copy_side_files(src, out, spec)
    return info


def _copy_side_files(src, out: Path, spec: ModelSpec) -> None:
    cfg = spec.to_dict()
    cfg.pop("quantization_config", None)  # FP8 weights were dequantized; nothing is FP8 any more
    _write_json_atomic(out / "config.json", cfg)
    src_path = Path(src)
    if str(src).endswith(".gguf"):
        from hetero.gguf import write_tokenizer_files

        write_tokenizer_files(src_path, out)
        return
    from hetero.checkpoint import resolve_model_path

    root = resolve_model_path(src_path)
    for name in _SIDE_FILES:
        if (root / name).is_file():
            shutil.copyfile(root / name, out / name)


def _dense_groups(spec: ModelSpec) -> dict[str, list[str]]:
    """Our dense parameter names, grouped by the file that holds them."""
    with torch.device("meta"):
        model = Transformer(spec)
    groups: dict[str, list[str]] = {"embed.safetensors": [], "head.safetensors": []}
    groups.update({layer_file(i): [] for i in range(spec.num_layers)})
    for name, _ in named_tensors(model):
        if ".mlp.experts." in name:
            continue
        m = _LAYER.match(name)
        file = (
            layer_file(int(m.group(1)))
            if m
            else ("embed.safetensors" if "embed" in name else "head.safetensors")
        )
        groups[file].append(name)
    return groups


def _dense_value(source, spec: ModelSpec, name: str) -> torch.Tensor:
    t = source.dense(spec, name, None)
    if keep_fp32(name):
        return t.float().contiguous()
    if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return t.to(torch.bfloat16).contiguous()
    if t.dtype == torch.float32 and source.is_quantized(spec, name):
        # Dequantized (FP8 blocks or GGUF quants): bf16 is what the device computes with anyway.
        return t.to(torch.bfloat16).contiguous()
    return t.contiguous()


def _layer_of(file: str) -> int | None:
    m = re.match(r"layer-(\d+)\.safetensors$", file)
    return int(m.group(1)) if m else None


def _packed_tensors(layer: int, packed) -> dict[str, np.ndarray]:
    prefix = f"model.layers.{layer}.mlp.experts."
    # Copies: bf16/int8 layers share one placeholder array between fields, which safetensors refuses.
    return {prefix + f: np.array(getattr(packed, f), copy=True) for f in PACKED_FIELDS} | {
        f"{prefix}shape": np.array(
            [
                packed.E,
                packed.H,
                packed.I,
                packed.group_size,
                int(packed.symmetric),
                FORMATS.index(packed.fmt),
            ],
            np.int64,
        )
    }


def _write_atomic(out: Path, file: str, tensors: dict[str, Any]) -> None:
    tmp = out / f".{file}.tmp"
    as_torch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in tensors.items()}
    # No header metadata: safetensors writes its keys in hash order, and a resumed conversion
    # must give byte-identical files.
    save_torch(as_torch, str(tmp))
    digest = sha256_file(tmp)
    (out / _HASH_DIR / f"{file}.sha256").write_text(digest)
    os.replace(tmp, out / file)


def _layer_formats(out: Path, spec: ModelSpec) -> dict[str, dict[str, Any]]:
    from hetero.packed import mmap_safetensors

    layers = {}
    for i in spec.moe_layers:
        arrays, _ = mmap_safetensors(out / layer_file(i))
        E, H, I, g, sym, fmt = (int(v) for v in arrays[f"model.layers.{i}.mlp.experts.shape"])  # noqa: E741
        layers[str(i)] = {
            "fmt": FORMATS[fmt],
            "group_size": g,
            "symmetric": bool(sym),
            "E": E,
            "H": H,
            "I": I,
        }
    return layers


def _finish(out: Path, files: list[str]) -> None:
    hashed = {}
    for file in [*files, "hetero.json", "config.json", *(f for f in _SIDE_FILES if (out / f).is_file())]:
        side = out / _HASH_DIR / f"{file}.sha256"
        digest = side.read_text().strip() if side.is_file() else sha256_file(out / file)
        hashed[file] = {"size": (out / file).stat().st_size, "sha256": digest}
    _write_json_atomic(out / "manifest.json", {"files": hashed})
    verify_manifest(out, full=True)
    shutil.rmtree(out / _HASH_DIR, ignore_errors=True)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="write a model (HF dir or .gguf) in hetero's packed layout, which loads by mmap",
    )
    p.add_argument("model", help="checkpoint directory, cached repo id, or .gguf file")
    p.add_argument("out_dir", nargs="?", help="directory to write (resumes an unfinished conversion)")
    p.add_argument(
        "--experts",
        choices=("int4", "int8", "bf16"),
        default=None,
        help="routed expert format (default int4; for GGUF: what its quant types map to)",
    )
    p.add_argument("--group-size", type=int, default=64, help="int4 quantization group (32, 64, 128)")
    p.add_argument("--verify", action="store_true", help="check a converted dir's sha256 manifest and exit")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from hetero.packed import is_converted

    if args.verify and args.out_dir is None:
        if not is_converted(args.model):
            raise HeteroError(f"{args.model} is not a converted model (no hetero.json)")
        files = verify_manifest(Path(args.model), full=True)
        print(f"{args.model}: {len(files)} files match manifest.json")
        return 0
    if args.out_dir is None:
        raise HeteroError("convert needs OUT_DIR (or --verify with a converted directory)")
    experts = args.experts
    if experts is None and not str(args.model).endswith(".gguf"):
        experts = "int4"
    out = convert(args.model, args.out_dir, experts=experts, group_size=args.group_size)
    print(f"wrote {out} (manifest verified)")
    return 0
