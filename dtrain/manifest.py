"""A directory's manifest: the size and SHA-256 of every file in it (subdirectories included).

Checkpoints (checkpoint.py) and the data cache's entries (data/text/cache.py) keep one, written after their
files, and check it before they are used: a truncated or corrupted file is found before it is read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(directory: Path, exclude: str) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under `directory` but `exclude` (the file that holds
    the manifest)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {
        name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in files
        if (name := p.relative_to(directory).as_posix()) != exclude
    }


def damage(directory: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """None when every file of the manifest is there with its size and checksum, else what is wrong."""
    if not files:
        return "empty manifest"
    for name, want in files.items():
        f = directory / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, expected {want['bytes']}"
        if sha256_file(f) != want["sha256"]:
            return f"{name} checksum mismatch"
    return None
