"""Launchers and the DeepSpeed engine as real jobs: the launch/ scripts start them, and every way of launching the
same tiny run gives the same model; the DeepSpeed engine resumes and refuses what it cannot run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers.launch import ROOT, TINY, env, model_state, summary, train
from tests.helpers.oracles import max_rel_diff
from tests.helpers.ranks import free_port

LAUNCH = ROOT / "launch"
TOL = 1e-5


def run(cmd: list[str], timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def reference_w2(tmp_path_factory) -> Path:
    """torchrun --standalone, 2 ranks, torch engine, fp32 all-reduce."""
    path = tmp_path_factory.mktemp("ref") / "allreduce-w2"
    train(path, "comm.strategy=allreduce", nproc=2)
    return path


# ------------------------------------------------------------------------------------------ DeepSpeed


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_deepspeed_launcher_with_dad_matches_torchrun_allreduce(tmp_path: Path, reference_w2: Path, zero_stage: int):
    run_dir = tmp_path / f"ds-dad-z{zero_stage}"
    port = free_port()
    proc = run(
        [
            str(LAUNCH / "deepspeed.sh"),
            TINY,
            "--set",
            "comm.strategy=dad",
            "train.comms_logger=true",
            f"train.zero_stage={zero_stage}",
            f"run.dir={run_dir}",
        ],
        NUM_GPUS="2",
        MASTER_PORT=str(port),
    )
    out = proc.stdout + proc.stderr
    assert "--local_rank=1" in out, "the deepspeed launcher started the workers"
    # DeepSpeed's comms logger sees every collective DeepSpeed makes: its start-up broadcast of the weights,
    # no gradient reduction of its own (all_reduce, reduce, reduce_scatter: the strategy's collectives go
    # through torch.distributed directly). ZeRO-1 adds its all-gather of the updated weight partitions.
    logged = out[out.index("Comm. Op") :]
    assert "broadcast" in logged and not re.search(r"^\S*reduce", logged, re.M), logged
    assert ("all_gather" in logged) == (zero_stage == 1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "shm workspace left behind"
    s = summary(run_dir)
    assert (s["engine"], s["world_size"], s["strategy"]) == ("deepspeed", 2, "dad")
    assert max_rel_diff(model_state(run_dir), model_state(reference_w2)) < TOL


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_deepspeed_engine_resumes_from_its_checkpoint(tmp_path: Path, reference_w2: Path, zero_stage: int):
    """ZeRO-0: the trainer's DCP checkpoint (module + our optimizer); ZeRO-1: DeepSpeed's own checkpoint (one
    optimizer partition per rank) inside the trainer's atomic step directory. Both restore the run exactly."""
    run_dir = tmp_path / f"ds-resume-z{zero_stage}"
    overrides = ("train.engine=deepspeed", f"train.zero_stage={zero_stage}")
    killed = train(
        run_dir,
        *overrides,
        nproc=2,
        check=False,
        extra_env={"DTRAIN_FAULT": "kill@train:step=5,rank=1", "DS_ACCELERATOR": "cpu"},
    )
    assert killed.returncode != 0 and not (run_dir / "model.pt").exists()
    step3 = run_dir / "checkpoints" / "step_00000003"
    meta = json.loads((step3 / "meta.json").read_text())
    if zero_stage:
        assert meta["state_format"] == "deepspeed" and not (step3 / ".metadata").exists()
        for r in (0, 1):
            assert f"deepspeed/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in meta["manifest"]
    else:
        assert meta["state_format"] == "dcp" and ".metadata" in meta["manifest"]
    resumed = train(run_dir, *overrides, nproc=2, resume=True, extra_env={"DS_ACCELERATOR": "cpu"})
    assert "resumed from" in resumed.stderr and "step 3" in resumed.stderr
    assert summary(run_dir)["engine"] == "deepspeed"
    assert max_rel_diff(model_state(run_dir), model_state(reference_w2)) == 0.0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("comm.strategy=ddp",), "wraps the model"),
        (("comm.strategy=ddp-powersgd",), "wraps the model"),
        (("train.zero_stage=2",), "train.zero_stage=2 is not supported"),
        (("train.zero_stage=3",), "train.zero_stage=3 is not supported"),
        (("train.zero_stage=2", "comm.strategy=dad"), "ZeRO-2/3 partition gradients inside DeepSpeed"),
    ],
)
def test_deepspeed_engine_refuses_before_starting(tmp_path: Path, overrides, message):
    """Exit 2 with one line, from a plain `dtrain train` process."""
    proc = train(tmp_path / "run", "train.engine=deepspeed", *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dtrain: error:") and message in last


# ------------------------------------------------------------------------------------------ torchrun


@pytest.fixture(scope="module")
def reference_w4(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "allreduce-w4"
    train(path, "comm.strategy=allreduce", nproc=4)
    return path


@pytest.mark.parametrize("mode", ["c10d", pytest.param("static", marks=pytest.mark.slow)])
def test_two_torchrun_agents_on_loopback_form_one_4_rank_job(tmp_path: Path, reference_w4: Path, mode: str):
    run_dir = tmp_path / f"multinode-{mode}"
    port = free_port()
    cmd = [str(LAUNCH / "torchrun_multinode.sh"), TINY, "--set", f"run.dir={run_dir}"]
    agents = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env(
                NNODES="2",
                NODE_RANK=str(r),
                NPROC="2",
                MASTER_ADDR="127.0.0.1",
                PORT=str(port),
                MODE=mode,
                JOB_ID=f"test-{port}",
            ),
        )
        for r in (0, 1)
    ]
    try:
        outputs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert summary(run_dir)["world_size"] == 4
    assert max_rel_diff(model_state(run_dir), model_state(reference_w4)) < TOL


# ------------------------------------------------------------------------------------------ scripts


@pytest.mark.parametrize("script", ["torchrun_single.sh", "torchrun_multinode.sh", "deepspeed.sh", "netns_cluster"])
def test_launch_scripts_without_arguments_print_usage_and_exit_2(script: str):
    proc = subprocess.run([str(LAUNCH / script)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage" in proc.stderr.lower()


def test_torchrun_single_script_runs_a_job(tmp_path: Path, reference_w2: Path):
    run_dir = tmp_path / "single"
    run([str(LAUNCH / "torchrun_single.sh"), "2", TINY, "--set", "comm.strategy=allreduce", f"run.dir={run_dir}"])
    assert max_rel_diff(model_state(run_dir), model_state(reference_w2)) == 0.0
