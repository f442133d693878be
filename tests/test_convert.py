"""`hetero convert`: the packed layout gives the source's logits, resumes, and detects corruption."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from hetero.apply import Placement, load_placed
from hetero.config import ModelSpec
from hetero.convert import convert
from hetero.errors import HeteroError
from hetero.packed import PackedModel, layer_file, verify_manifest

FAMILIES = ["deepseek-v2", "deepseek-v3", "qwen2-57b-a14b", "qwen3-30b-a3b", "mixtral-8x7b"]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return lambda preset: tiny_checkpoint(preset, seed=3)


def last_logits(model, prompt: list[int]) -> torch.Tensor:
    from test_hybrid import decode

    _, logits = decode(model, prompt, steps=2)
    return torch.cat(logits)


def every_third(spec: ModelSpec) -> dict[int, list[int]]:
    return {i: list(range(0, spec.num_experts, 3)) for i in spec.moe_layers}


@pytest.mark.parametrize("preset", FAMILIES)
def test_bf16_conversion_gives_the_source_logits(tiny, tmp_path, preset):
    src = tiny(preset)
    out = convert(src, tmp_path / "out", experts="bf16", progress=False)
    spec = ModelSpec.from_pretrained(out)
    prompt = list(range(1000, 1016))
    cpu = torch.device("cpu")
    place = Placement(every_third(spec), expert_format="bf16")
    ref = last_logits(load_placed(src, place, cpu, torch.float32, progress=False), prompt)
    got = last_logits(load_placed(out, place, cpu, torch.float32, progress=False), prompt)
    # The same bytes reach the same kernels; only the float summation order may differ.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,tol", [("int8", 3e-2), ("int4", 0.2)])
def test_quantized_conversion_within_format_error(tiny, tmp_path, fmt, tol):
    src = tiny("deepseek-v3")
    out = convert(src, tmp_path / "out", experts=fmt, group_size=32, progress=False)
    prompt = list(range(2000, 2016))
    cpu = torch.device("cpu")
    from test_hybrid import decode

    from hetero.model import load_model

    _, ref = decode(load_model(str(src), dtype=torch.float32), prompt, steps=1)
    # All experts in RAM: the packed arrays on disk are exactly what load-time packing makes.
    packed_now = load_placed(
        src, Placement(expert_format=fmt, group_size=32), cpu, torch.float32, progress=False
    )
    mapped = load_placed(out, Placement(), cpu, torch.float32, progress=False)
    _, a = decode(packed_now, prompt, steps=1)
    _, b = decode(mapped, prompt, steps=1)
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    err = float((b[0] - ref[0]).norm() / ref[0].norm())
    assert 0 < err < tol


def test_packed_arrays_are_mmapped_views(tiny, tmp_path):
    out = convert(tiny("qwen3-30b-a3b"), tmp_path / "out", experts="int4", group_size=32, progress=False)
    model = PackedModel(out)
    layer = next(iter(model.info["layers"]))
    packed = model.experts(int(layer))
    assert packed.fmt == "int4" and packed.gate_up_scale.dtype == np.uint16
    # A view into the file's mapping, not an array of its own.
    assert packed.gate_up.base is not None and not packed.gate_up.flags.owndata
    assert model.layer_formats()[int(layer)] == "int4"


def test_interrupted_conversion_resumes_to_the_same_files(tiny, tmp_path, monkeypatch):
    src = tiny("deepseek-v2")
    whole = convert(src, tmp_path / "whole", experts="int4", progress=False)
    import hetero.convert as conv

    real = conv._write_atomic
    calls = {"n": 0}

    def dies_on_third(out, file, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            # What a kill mid-write leaves: a temporary file, never a final name.
            (out / f".{file}.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        real(out, file, tensors)

    monkeypatch.setattr(conv, "_write_atomic", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "resumed", experts="int4", progress=False)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    with pytest.raises(HeteroError, match="did not finish"):
        PackedModel(tmp_path / "resumed")
    written = []
    monkeypatch.setattr(conv, "_write_atomic", lambda out, f, t: written.append(f) or real(out, f, t))
    convert(src, tmp_path / "resumed", experts="int4", progress=False)
    assert written  # the unfinished files were written
    assert "embed.safetensors" not in written  # finished files were skipped
    a = json.loads((whole / "manifest.json").read_text())["files"]
    b = json.loads((tmp_path / "resumed" / "manifest.json").read_text())["files"]
    same = {k: v for k, v in a.items() if k not in ("hetero.json",)}
    assert {k: v for k, v in b.items() if k in same} == same
    with pytest.raises(HeteroError, match="int8"):
        convert(src, tmp_path / "resumed", experts="int8", progress=False)


def test_corrupted_file_is_named(tiny, tmp_path):
    out = convert(tiny("mixtral-8x7b"), tmp_path / "out", experts="int8", progress=False)
    victim = out / layer_file(1)
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # same size: only the full hash can tell
    victim.write_bytes(bytes(data))
    verify_manifest(out)  # the fast check passes
    with pytest.raises(HeteroError, match=str(victim.name)):
        PackedModel(out, verify=True)
    with open(victim, "ab") as f:
        f.write(b"x")
    with pytest.raises(HeteroError, match=f"{victim.name}.*truncated or corrupted"):
        load_placed(out, Placement(), torch.device("cpu"), torch.float32, progress=False)
    os.remove(victim)
    with pytest.raises(HeteroError, match="missing"):
        PackedModel(out)


def test_cli_verify(tiny, tmp_path, capsys):
    from hetero.cli import main

    out = convert(tiny("qwen2-57b-a14b"), tmp_path / "out", experts="int4", progress=False)
    assert main(["convert", str(out), "--verify"]) == 0
    assert "match manifest.json" in capsys.readouterr().out
