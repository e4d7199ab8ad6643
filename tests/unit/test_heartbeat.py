"""The heartbeat thread publishes this rank's step to the store, and `close()` leaves no thread behind."""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from dtrain.distributed import DistEnv, Heartbeat
from tests.helpers.ranks import free_port


def test_heartbeat_publishes_the_step_and_close_joins_its_thread(monkeypatch):
    port = free_port()
    server = dist.TCPStore(
        "127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=10)
    )
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    beat = Heartbeat(
        DistEnv(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend="gloo"), interval_s=0.05
    )
    beat.beat(7)
    store = dist.PrefixStore("dtrain/heartbeat/0", server)
    store.wait(["1"], datetime.timedelta(seconds=10))
    deadline = time.monotonic() + 10
    while store.get("1").split()[0] != b"7" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.get("1").split()[0] == b"7"
    beat.close()
    assert not beat._thread.is_alive()  # joined, not left to be killed at interpreter exit
