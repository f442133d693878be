"""hetero's own model layout: the CPU kernels' packed experts on disk, mapped straight back in.

A converted model directory holds

| file                         | contents                                                       |
|------------------------------|----------------------------------------------------------------|
| ``hetero.json``              | the formats: expert format, group size, symmetric, per layer E/H/I |
| ``embed.safetensors``        | ``model.embed_tokens.weight``                                  |
| ``layer-NNNNN.safetensors``  | layer N under our parameter names; a MoE layer adds the packed |
|                              | experts as ``model.layers.N.mlp.experts.<PackedExperts field>``|
| ``head.safetensors``         | ``model.norm.weight``, ``lm_head.weight``                      |
| ``manifest.json``            | size and sha256 of every file; written last (no manifest = unfinished) |
| config.json, tokenizer files | as in the source checkpoint (``quantization_config`` dropped)   |

Packed arrays are read by parsing the safetensors header and taking numpy views of a
private (copy-on-write) mmap of the file: nothing is copied or repacked, pages come from
the page cache on first touch, and experts that never run on the CPU are never read.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetero.errors import HeteroError

FORMAT_NAME = "hetero-packed"
FORMAT_VERSION = 1
PACKED_FIELDS = ("gate_up", "down", "gate_up_scale", "down_scale", "gate_up_zero", "down_zero")
_NP_DTYPES = {
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "F16": np.float16,
    "U32": np.uint32,
    "I32": np.int32,
    "F32": np.float32,
    "I64": np.int64,
    "F64": np.float64,
    "BOOL": np.bool_,
}


class PackedModelError(HeteroError):
    """A converted model directory that is incomplete, corrupted or of another version."""


def is_converted(path: str | os.PathLike) -> bool:
    return (Path(path) / "hetero.json").is_file()


def layer_file(i: int) -> str:
    return f"layer-{i:05d}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_manifest(root: Path, full: bool = False) -> dict[str, dict[str, Any]]:
    """Check every file the manifest lists: sizes always, sha256 when ``full``."""
    man_file = root / "manifest.json"
    if not man_file.is_file():
        raise PackedModelError(
            f"{root} has hetero.json but no manifest.json: the conversion did not finish; "
            "run the same `hetero convert` again to resume it"
        )
    manifest = json.loads(man_file.read_text())["files"]
    for name, entry in manifest.items():
        file = root / name
        if not file.is_file():
            raise PackedModelError(f"{file} is listed in manifest.json but missing; re-run `hetero convert`")
        size = file.stat().st_size
        if size != entry["size"]:
            raise PackedModelError(
                f"{file} is {size} bytes, manifest.json says {entry['size']}: the file is truncated or "
                "corrupted; delete it and re-run `hetero convert` to rewrite it"
            )
        if full and sha256_file(file) != entry["sha256"]:
            raise PackedModelError(
                f"{file} does not match its sha256 in manifest.json: the file is corrupted; "
                "delete it and re-run `hetero convert` to rewrite it"
            )
    return manifest


def mmap_safetensors(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Numpy views of every numpy-typed tensor in ``file`` over one copy-on-write mmap, and the header metadata.

    Copy-on-write (not read-only) so the arrays are writeable numpy arrays like freshly packed
    ones; the kernels never write them, so no page is ever copied.
    """
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + header_len
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _NP_DTYPES:
            continue  # bf16 / fp8 dense tensors: read through safetensors as torch tensors
        dtype = np.dtype(_NP_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=base + begin)
        out[name] = arr.reshape(info["shape"])
    return out, meta


class PackedModel:
    """A converted model directory: dense tensors by our names, packed experts per layer."""

    def __init__(self, path: str | os.PathLike, verify: bool = False):
        self.path = Path(path)
        try:
            self.info = json.loads((self.path / "hetero.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PackedModelError(f"cannot read {self.path / 'hetero.json'}: {e}") from None
        if self.info.get("format") != FORMAT_NAME or self.info.get("version") != FORMAT_VERSION:
            raise PackedModelError(
                f"{self.path} holds format {self.info.get('format')!r} version {self.info.get('version')}; "
                f"this hetero reads {FORMAT_NAME!r} version {FORMAT_VERSION}: convert the model again"
            )
        self.manifest = verify_manifest(self.path, full=verify)
        self.weight_map: dict[str, str] = self.info["weight_map"]
        self._handles: dict[str, Any] = {}

    @property
    def expert_format(self) -> str:
        return self.info["experts"]["fmt"]

    @property
    def group_size(self) -> int:
        return int(self.info["experts"]["group_size"])

    def layer_formats(self) -> dict[int, str]:
        return {int(k): v["fmt"] for k, v in self.info["layers"].items()}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        """A dense tensor (attention, norms, router, shared experts, embedding, head), mmapped."""
        from safetensors import safe_open

        if name not in self.weight_map:
            raise PackedModelError(f"tensor {name!r} is missing from the converted model at {self.path}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, framework="pt")
        return self._handles[file].get_tensor(name)

    def experts(self, layer: int):
        """Layer ``layer``'s routed experts as ``cpu_kernels.PackedExperts`` over mmapped arrays."""
        from cpu_kernels import PackedExperts

        entry = self.info["layers"].get(str(layer))
        if entry is None:
            raise PackedModelError(f"layer {layer} has no packed experts in {self.path / 'hetero.json'}")
        arrays, _ = mmap_safetensors(self.path / layer_file(layer))
        prefix = f"model.layers.{layer}.mlp.experts."
        fields = {f: arrays[prefix + f] for f in PACKED_FIELDS}
        return PackedExperts(
            entry["fmt"],
            int(entry["group_size"]),
            int(entry["E"]),
            int(entry["H"]),
            int(entry["I"]),
            **fields,
            symmetric=bool(entry["symmetric"]),
        )


def dequantize_packed(
    packed, ids: list[int], dtype: torch.dtype, device: torch.device | None = None
) -> tuple[torch.Tensor, ...]:
    """Experts ``ids`` of a PackedExperts -> gate, up [n, I, H], down [n, H, I]: the kernel's exact weights.

    Same arithmetic as ``cpu_kernels.dequantize`` (float32, exact), on torch tensors, on ``device``
    (the packed bytes move there first; default: the host).
    """
    from hetero.experts import unpack_experts

    idx = np.asarray(ids, dtype=np.int64)
    arrays = {}
    for name in PACKED_FIELDS:
        a = getattr(packed, name)
        rows = a[idx] if a.ndim > 1 and a.shape[0] == packed.E else a
        if rows.dtype == np.uint16:
            rows = rows.view(np.int16)  # torch has no uint16 views; bits reinterpreted below
        arrays[name] = torch.from_numpy(np.ascontiguousarray(rows)).to(device or "cpu")
    gate, up, down = unpack_experts(
        arrays, packed.fmt, packed.group_size, packed.H, packed.I, packed.symmetric
    )
    return gate.to(dtype), up.to(dtype), down.to(dtype)
