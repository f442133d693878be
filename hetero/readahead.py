"""Reading a checkpoint's files into the page cache in the background.

A start from a cold page cache is bound by the disk, yet the disk sits idle while Python imports
torch (seconds), and the loader then reads tensor by tensor, mmapped experts only when the first
token touches them: page faults scattered over the files. Reading every file front to back on a
few threads from the very start keeps the disk busy the whole time; the loader then finds its
pages cached. A warm start pays only a copy from the page cache on threads that would idle.

Standard library only, so that ``hetero``'s entry point can start it before importing torch.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

CHUNK = 16 << 20
_started: set[str] = set()
_lock = threading.Lock()


def model_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint directory, or a GGUF file and its split siblings."""
    p = Path(path)
    if p.is_dir():
        return sorted(p.glob("*.safetensors"))
    if p.is_file() and p.suffix == ".gguf":
        split = re.match(r"(.*)-\d{5}-of-(\d{5})\.gguf$", p.name)
        if split:
            return sorted(p.parent.glob(f"{split.group(1)}-?????-of-{split.group(2)}.gguf"))
        return [p]
    return []


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown: do not risk evicting someone else's cache


def read_ahead(path: str | os.PathLike, threads: int = 4) -> list[threading.Thread]:
    """Start reading ``path``'s weight files on ``threads`` daemon threads; returns them (none when
    already started for this path, when there is nothing to read, or when the files would not fit
    in the available RAM, where reading ahead would only evict what the loader just read)."""
    files = model_files(path)
    key = str(Path(path).resolve())
    with _lock:
        if not files or key in _started:
            return []
        if sum(f.stat().st_size for f in files) > 0.8 * _available_ram():
            return []
        _started.add(key)
    todo = iter(files)
    take = threading.Lock()

    def work() -> None:
        buf = bytearray(CHUNK)
        while True:
            with take:
                f = next(todo, None)
            if f is None:
                return
            try:
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
            except OSError:  # the loader reports unreadable files with their names
                pass

    out = [threading.Thread(target=work, name="hetero-readahead", daemon=True) for _ in range(threads)]
    for t in out:
        t.start()
    return out


def read_ahead_from_argv(argv: list[str]) -> None:
    """The command line's model, before anything is parsed or imported: the first argument after
    the command that names an existing checkpoint directory or GGUF file."""
    if not argv or argv[0] not in ("generate", "serve", "bench", "convert"):
        return
    for arg in argv[1:]:
        if not arg.startswith("-") and model_files(arg):
            read_ahead(arg)
            return
