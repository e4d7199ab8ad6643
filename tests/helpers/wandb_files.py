"""Reading an offline wandb run file."""

from __future__ import annotations

import time
from pathlib import Path


def written(run_file: Path, keys: list[str], timeout_s: float = 60.0) -> list[str]:
    """The keys not (yet) in an offline run file after up to `timeout_s`: wandb's service process writes the
    file after `finish()` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        blob = run_file.read_bytes()
        missing = [key for key in keys if key.encode() not in blob]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)
