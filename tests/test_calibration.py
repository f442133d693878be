"""The CPU expert kernels' measured decode bandwidth, recorded in the hardware profile."""

import dataclasses
import json
import math

import pytest

import placement
from cpu_kernels.probe import decode_bandwidth
from hetero import planning
from placement.cost import PROBE_EXPERTS, PROBE_TOP_K


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
def test_decode_bandwidth_is_a_rate(fmt):
    for tokens in (1, 4):
        bw = decode_bandwidth(fmt, 1, tokens, shape=(8, 256, 128, 2), seconds=0.02, max_bytes=16 << 20)
        assert math.isfinite(bw) and 1e7 < bw < 1e13


def test_kernel_rate_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake(fmt, threads, tokens=1, shape=None):
        calls.append((fmt, threads, tokens))
        assert shape[0] == PROBE_EXPERTS and shape[3] == PROBE_TOP_K  # the layer kernel_bw assumes
        return 12.5e9 / tokens

    monkeypatch.setattr("cpu_kernels.probe.decode_bandwidth", fake)
    base = dataclasses.replace(placement.detect(probe=False), measured=("cpu_read_bw",), key="test")
    monkeypatch.setattr("placement.hardware.probe_cpu_bandwidth", lambda *a, **k: base.cpu_read_bw)
    prof = planning.with_kernel_rate(base, "int8")
    assert prof.cpu_kernel_bw == {"int8": 12.5e9, "int8@16": 12.5e9 / 16} and "cpu_kernel_bw" in prof.measured
    assert planning.with_kernel_rate(prof, "int8") is prof  # known: not measured again
    assert [c[2] for c in calls] == [1, 16] and calls[0][1] >= 1
    cached = placement.HardwareProfile.from_dict(
        json.loads((tmp_path / "hetero" / "profile-test.json").read_text())
    )
    assert cached.cpu_kernel_bw == prof.cpu_kernel_bw
    # A profile of defaults (--no-probe) is not measured behind the user's back.
    assert planning.with_kernel_rate(placement.detect(probe=False), "int4").cpu_kernel_bw == {}
    assert len(calls) == 2


def test_kernel_rate_is_a_share_of_the_read_bandwidth_beside_it(monkeypatch, tmp_path):
    """Timed while the machine reads at half the profile's bandwidth, the kernels are priced at their
    share of the bandwidth beside them, applied to the profile's (the faster of the probes before
    and after them); without a probe (no Numba), as timed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("cpu_kernels.probe.decode_bandwidth", lambda fmt, threads, tokens=1, shape=None: 4e9)
    base = dataclasses.replace(placement.detect(probe=False), measured=("cpu_read_bw",), key="test")
    reads = iter([base.cpu_read_bw / 4, base.cpu_read_bw / 2])
    monkeypatch.setattr("placement.hardware.probe_cpu_bandwidth", lambda *a, **k: next(reads))
    prof = planning.with_kernel_rate(base, "int4")
    assert prof.cpu_kernel_bw == {"int4": 8e9, "int4@16": 8e9}
    monkeypatch.setattr("placement.hardware.probe_cpu_bandwidth", lambda *a, **k: None)
    prof = planning.with_kernel_rate(dataclasses.replace(base, key="other"), "int8")
    assert prof.cpu_kernel_bw == {"int8": 4e9, "int8@16": 4e9}


def test_a_faster_read_beside_the_kernels_raises_the_profiles_bandwidth(monkeypatch, tmp_path):
    """A read probe only comes out low by chance: where the probes beside the kernels read faster
    than the profile's, the profile (and the cache) take the faster one, and the rates of formats
    measured before keep their shares of it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("cpu_kernels.probe.decode_bandwidth", lambda fmt, threads, tokens=1, shape=None: 6e9)
    base = dataclasses.replace(
        placement.detect(probe=False), measured=("cpu_read_bw",), key="test", cpu_kernel_bw={"int4": 5e9}
    )
    reads = iter([base.cpu_read_bw * 1.5, base.cpu_read_bw * 1.2])
    monkeypatch.setattr("placement.hardware.probe_cpu_bandwidth", lambda *a, **k: next(reads))
    prof = planning.with_kernel_rate(base, "int8")
    assert prof.cpu_read_bw == pytest.approx(base.cpu_read_bw * 1.5)
    assert prof.cpu_kernel_bw == pytest.approx({"int4": 7.5e9, "int8": 6e9, "int8@16": 6e9})
    cached = placement.HardwareProfile.from_dict(
        json.loads((tmp_path / "hetero" / "profile-test.json").read_text())
    )
    assert cached.cpu_read_bw == pytest.approx(prof.cpu_read_bw)


def test_measured_again_keeps_the_faster_rate(monkeypatch, tmp_path):
    """A load onto a GPU measures a known format's rate again; the faster of the two stays."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rates = iter([3e9, 3e9, 5e9, 5e9, 4e9, 4e9])  # batch 1 then 16, three times
    monkeypatch.setattr(
        "cpu_kernels.probe.decode_bandwidth", lambda fmt, threads, tokens=1, shape=None: next(rates)
    )
    base = dataclasses.replace(placement.detect(probe=False), measured=("cpu_read_bw",), key="test")
    monkeypatch.setattr("placement.hardware.probe_cpu_bandwidth", lambda *a, **k: base.cpu_read_bw)
    prof = planning.with_kernel_rate(base, "int4")
    assert prof.cpu_kernel_bw["int4"] == 3e9
    assert planning.with_kernel_rate(prof, "int4") is prof  # a plan alone: the cached rate
    prof = planning.with_kernel_rate(prof, "int4", again=True)
    assert prof.cpu_kernel_bw == {"int4": 5e9, "int4@16": 5e9}
    prof = planning.with_kernel_rate(prof, "int4", again=True)
    assert prof.cpu_kernel_bw == {"int4": 5e9, "int4@16": 5e9}  # slower this time: kept
    assert prof.measured.count("cpu_kernel_bw") == 1


def test_runtime_plans_with_the_kernels_rate(monkeypatch, tmp_path, tiny_checkpoint):
    """The plan a loaded runtime executes (its predictions, stream threshold and speculation
    prices) uses the CPU kernels' measured rate in its expert format, as `hetero plan` does."""
    import cpu_kernels.moe
    from hetero.runtime import RuntimeOptions, load_runtime

    # The runtime's CPU worker sets the kernels' thread count process-wide: restored afterwards.
    monkeypatch.setitem(cpu_kernels.moe._state, "threads", cpu_kernels.moe._state["threads"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = dataclasses.replace(placement.detect(probe=False), measured=("cpu_read_bw",), key="test")
    monkeypatch.setattr(placement, "detect", lambda *a, **k: base)
    monkeypatch.setattr(
        "cpu_kernels.probe.decode_bandwidth", lambda fmt, threads, tokens=1, shape=None: 7.25e9
    )
    monkeypatch.setattr("placement.hardware.probe_cpu_bandwidth", lambda *a, **k: base.cpu_read_bw)
    path = tiny_checkpoint("deepseek-v2-lite", seed=3)
    rt = load_runtime(path, RuntimeOptions(offload=True, experts="int8", gpu_mem=2 << 30, max_model_len=64))
    assert rt.plan.cost_inputs.rates.cpu_bw == 7.25e9
