"""Reading a checkpoint into the page cache ahead of the loader."""

from __future__ import annotations

import os

from hetero import readahead


def test_reads_every_weight_file_once(tmp_path, monkeypatch):
    for i in range(5):
        (tmp_path / f"model-{i}.safetensors").write_bytes(os.urandom(3 * readahead.CHUNK // 2))
    (tmp_path / "config.json").write_text("{}")
    read = []
    real_open = open

    def spy(f, *a, **k):
        if str(f).endswith(".safetensors"):
            read.append(os.path.basename(f))
        return real_open(f, *a, **k)

    monkeypatch.setattr("builtins.open", spy)
    threads = readahead.read_ahead(tmp_path, threads=3)
    assert len(threads) == 3
    for t in threads:
        t.join(timeout=30)
    assert sorted(read) == [f"model-{i}.safetensors" for i in range(5)]
    assert readahead.read_ahead(tmp_path) == []  # once per path


def test_split_gguf_and_the_command_line(tmp_path, monkeypatch):
    parts = [tmp_path / f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for p in parts:
        p.write_bytes(b"GGUF")
    (tmp_path / "other-00001-of-00002.gguf").write_bytes(b"GGUF")
    assert readahead.model_files(parts[1]) == parts
    asked = []
    monkeypatch.setattr(readahead, "read_ahead", lambda p, threads=4: asked.append(str(p)))
    # An option's value that is no checkpoint is passed over; plan and unknown commands read nothing.
    readahead.read_ahead_from_argv(["generate", "--prompt", "hi", str(parts[0]), "--greedy"])
    readahead.read_ahead_from_argv(["plan", str(parts[0])])
    readahead.read_ahead_from_argv(["serve", "--port", "8000"])
    assert asked == [str(parts[0])]


def test_skips_what_would_not_fit_in_ram(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    monkeypatch.setattr(readahead, "_available_ram", lambda: 1000)
    assert readahead.read_ahead(tmp_path) == []
