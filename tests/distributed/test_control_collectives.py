"""dtrain.distributed's control collectives on real ranks: results, and tensors left on the caller's device."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.ranks import run_ranks


def _reductions(rank: int, world: int) -> dict[str, list[float]]:
    from dtrain.distributed import all_ranks_agree, all_reduce_max, all_reduce_min, all_reduce_sum

    mine = torch.tensor([float(rank), 10.0 - rank], dtype=torch.float64)
    return {
        "sum": all_reduce_sum(mine.clone()).tolist(),
        "max": all_reduce_max(mine.clone()).tolist(),
        "min": all_reduce_min(mine.clone()).tolist(),
        "agree": [all_ranks_agree(True), all_ranks_agree(rank != 1)],
    }


def test_all_reduce_sum_max_min():
    for res in run_ranks(_reductions, 2):
        assert res["sum"] == [1.0, 19.0] and res["max"] == [1.0, 10.0] and res["min"] == [0.0, 9.0]
        assert res["agree"] == [True, False]


def _broadcast_gather_barrier(rank: int, world: int) -> dict:
    from dtrain.distributed import all_gather_objects, barrier, broadcast_

    barrier()
    chosen = broadcast_(torch.tensor([100 + rank], dtype=torch.int64), src=1)
    rows = torch.full((rank + 1,), rank)  # a different shape on every rank: objects, not tensors, are gathered
    return {"broadcast": chosen.tolist(), "gathered": all_gather_objects({"rank": rank, "rows": rows})}


def test_broadcast_all_gather_objects_and_barrier():
    for res in run_ranks(_broadcast_gather_barrier, 2):
        assert res["broadcast"] == [101]
        assert [g["rank"] for g in res["gathered"]] == [0, 1]
        assert [g["rows"].tolist() for g in res["gathered"]] == [[0], [1, 1]]


def _on_a_cuda_only_group(rank: int, world: int) -> dict[str, str]:
    from dtrain.distributed import all_reduce_sum, broadcast_

    torch.cuda.set_device(0)
    on_cpu = all_reduce_sum(torch.tensor([rank + 1.0]))  # gloo registered for CUDA only: moved there and back
    on_cuda = broadcast_(torch.tensor([rank + 1.0], device="cuda"), src=1)
    return {"cpu": f"{on_cpu.device} {on_cpu.tolist()}", "cuda": f"{on_cuda.device} {on_cuda.tolist()}"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_only_backend_gets_cuda_tensors_and_the_caller_its_own():
    for res in run_ranks(_on_a_cuda_only_group, 2, backend="cuda:gloo"):
        assert res == {"cpu": "cpu [3.0]", "cuda": "cuda:0 [2.0]"}


def _run_on_main(rank: int, world: int) -> dict:
    from dtrain.config import ConfigError
    from dtrain.distributed import broadcast_object, run_on_main, take_control_bytes

    take_control_bytes()
    ran = []
    value = run_on_main(lambda: ran.append(rank) or {"from": rank, "blob": "x" * 1000})
    sent = take_control_bytes()
    picked = broadcast_object(f"rank {rank}", src=1)

    def refuse():
        raise ConfigError("data.path: /nowhere does not exist")

    try:
        run_on_main(refuse)
        error = None
    except ConfigError as err:
        error = str(err)
    return {"value": value, "ran": ran, "sent": sent, "picked": picked, "error": error}


def test_run_on_main_runs_once_and_hands_every_rank_its_result_or_its_error():
    results = run_ranks(_run_on_main, 2)
    for rank, res in enumerate(results):
        assert res["value"] == {"from": 0, "blob": "x" * 1000}
        assert res["ran"] == ([0] if rank == 0 else [])
        assert res["picked"] == "rank 1"
        assert res["error"] == "data.path: /nowhere does not exist"  # raised on rank 1 too, instead of a hang
        assert 1000 < res["sent"] < 1200  # one copy of the pickle (and its size), counted as control bytes
