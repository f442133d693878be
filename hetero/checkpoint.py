"""Reading Hugging Face checkpoints: sharded safetensors by mmap, FP8 block dequantization.

Models are named by a local directory or by a repo id found in the local Hugging Face
cache (``models--ORG--NAME/snapshots/<rev>/``); nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from hetero.errors import HeteroError

FP8_BLOCK = 128


def scale_inv_name(name: str) -> str:
    """The name an FP8 checkpoint gives the block scales of the weight ``name``."""
    return name.replace(".weight", ".weight_scale_inv")


class CheckpointError(HeteroError):
    """A checkpoint that is missing, incomplete or unreadable."""


def hf_cache_dirs() -> list[Path]:
    """Where a Hugging Face cache may live, in the order the hub library looks."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    home = Path(
        os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    )
    dirs.append(home.expanduser() / "hub")
    return dirs


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A checkpoint directory for ``name``: a local path, or ``ORG/NAME`` in the local HF cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.suffix == ".json" and path.is_file():
        return path.parent
    looked = [str(path.resolve())]
    text = str(name)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        org, repo = text.split("/")
        for cache in hf_cache_dirs():
            root = cache / f"models--{org}--{repo}"
            looked.append(str(root / "snapshots"))
            snap = _cached_snapshot(root)
            if snap is not None:
                return snap
    raise CheckpointError(
        f"model {text!r} not found; looked in: {', '.join(looked)}. Pass a checkpoint directory "
        "(config.json + *.safetensors), a repo id already in the local Hugging Face cache, "
        "or make one with `hetero make-model PRESET DIR`"
    )


def _cached_snapshot(root: Path) -> Path | None:
    snaps = root / "snapshots"
    if not snaps.is_dir():
        return None
    ref = root / "refs" / "main"
    if ref.is_file():
        snap = snaps / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    for snap in sorted(snaps.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if (snap / "config.json").is_file():
            return snap
    return None


_FP8_VALUES: dict[torch.dtype, torch.Tensor] = {}


def dequantize_fp8_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK, out: torch.Tensor | None = None
) -> torch.Tensor:
    """float8 [N, K] with one scale per ``block`` x ``block`` tile, scale_inv [ceil(N/b), ceil(K/b)]
    -> float32 [N, K] (into ``out`` when given). One parallel pass: each code's value from a
    256-entry table, times its tile's scale (torch's own float8 cast runs on one core)."""
    from cpu_kernels.formats import fp8_block_dequantize

    if weight.dtype not in _FP8_VALUES:  # exact: every float8 code cast once
        _FP8_VALUES[weight.dtype] = torch.arange(256, dtype=torch.uint8).view(weight.dtype).float()
    out = torch.empty(weight.shape, dtype=torch.float32) if out is None else out
    fp8_block_dequantize(
        weight.contiguous().view(torch.uint8).numpy(),
        _FP8_VALUES[weight.dtype].numpy(),
        scale_inv.float().contiguous().numpy(),
        block,
        out.numpy(),
    )
    return out


class Checkpoint:
    """The tensors of one checkpoint directory, read lazily from mmapped safetensors shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = resolve_model_path(path)
        self.weight_map = self._weight_map()
        self._handles: dict[str, object] = {}
        cfg_file = self.path / "config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        qc = cfg.get("quantization_config") or {}
        self.fp8_block = tuple(qc.get("weight_block_size") or (FP8_BLOCK, FP8_BLOCK))

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(
                f"no *.safetensors files and no model.safetensors.index.json in {self.path}"
            )
        out = {}
        for shard in shards:
            with safe_open(shard, framework="pt") as f:
                out.update(dict.fromkeys(f.keys(), shard.name))
        return out

    def _open(self, shard: str):
        if shard not in self._handles:
            file = self.path / shard
            if not file.is_file():
                raise CheckpointError(
                    f"shard {shard} is listed in model.safetensors.index.json but missing from {self.path}; "
                    "re-download or re-create the checkpoint"
                )
            self._handles[shard] = safe_open(file, framework="pt")
        return self._handles[shard]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (mmapped; no dequantization)."""
        if name not in self.weight_map:
            raise CheckpointError(
                f"tensor {name!r} not found in {self.path} (the checkpoint's index lacks it)"
            )
        shard = self.weight_map[name]
        handle = self._open(shard)
        try:
            return handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"tensor {name!r} could not be read from {self.path / shard}: {e}"
            ) from None

    def get(
        self, name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tensor in a usable dtype: FP8 weights dequantized by their block scales. With
        ``out`` (of the tensor's shape, in ``dtype``) the result is written there."""
        t = self.raw(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = scale_inv_name(name)
            if scale_name not in self.weight_map:
                raise CheckpointError(f"FP8 tensor {name!r} has no {scale_name!r} in {self.path}")
            direct = out is not None and out.dtype == torch.float32 and out.is_contiguous()
            t = dequantize_fp8_blocks(t, self.raw(scale_name), self.fp8_block[0], out if direct else None)
            if direct:
                return out
        if out is not None:
            return out.copy_(t)  # converts to out's dtype as it copies
        return t if dtype is None else t.to(dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}")
        handle = self._open(self.weight_map[name])
        return tuple(handle.get_slice(name).get_shape())
