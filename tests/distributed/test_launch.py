"""Launchers and the DeepSpeed engine: the launch/ scripts start real jobs, and every way of launching the same
tiny run gives the same model."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from launch_utils import ROOT, TINY, env, max_rel_diff, model_state, summary, train

LAUNCH = ROOT / "launch"
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
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
    proc = run([str(LAUNCH / "deepspeed.sh"), TINY, "--set", "comm.strategy=dad", "train.comms_logger=true",
                f"train.zero_stage={zero_stage}", f"run.dir={run_dir}"], NUM_GPUS="2", MASTER_PORT=str(port))
    out = proc.stdout + proc.stderr
    assert "--local_rank=1" in out, "the deepspeed launcher started the workers"
    # DeepSpeed's comms logger sees every collective DeepSpeed makes: its start-up broadcast of the weights,
    # no gradient reduction of its own (all_reduce, reduce, reduce_scatter: the strategy's collectives go
    # through torch.distributed directly). ZeRO-1 adds its all-gather of the updated weight partitions.
    logged = out[out.index("Comm. Op"):]
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
    killed = train(run_dir, *overrides, nproc=2, check=False,
                   extra_env={"DTRAIN_FAULT": "kill@train:step=5,rank=1", "DS_ACCELERATOR": "cpu"})
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


class _FakeEngine:
    """An engine that stores model + optimizer itself, in a subdirectory (as DeepSpeed's does)."""
    state_format = "fake"

    def __init__(self) -> None:
        self.loaded = None

    def save_state(self, directory: Path) -> None:
        (directory / "fake" / "part").mkdir(parents=True)
        (directory / "fake" / "part" / "optim.bin").write_bytes(b"partition")

    def load_state(self, directory: Path) -> None:
        self.loaded = (directory / "fake" / "part" / "optim.bin").read_bytes()


def test_engine_owned_state_is_in_the_manifest_and_its_format_is_checked(tmp_path: Path):
    import torch

    from dtrain.checkpoint import Checkpointer, verify
    from dtrain.config import ConfigError

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(tmp_path, rank=0, world_size=1)
    path = ckpt.save(3, model, opt, {"x": 1}, {"scheduler": {}}, engine=_FakeEngine())
    meta = json.loads((path / "meta.json").read_text())
    assert meta["state_format"] == "fake" and set(meta["manifest"]) == {"fake/part/optim.bin", "rank0.pt"}
    assert verify(path) is None and ckpt.latest_valid() == path
    engine = _FakeEngine()
    assert ckpt.load(path, model, opt, engine=engine)[1] == {"x": 1} and engine.loaded == b"partition"
    with pytest.raises(ConfigError, match="stores model and optimizer as 'fake', this run needs 'dcp'"):
        ckpt.load(path, model, opt)
    with pytest.raises(ConfigError, match="partitioned over 1 ranks .* not 2"):
        Checkpointer(tmp_path, rank=0, world_size=2).load(path, model, opt, engine=engine)
    (path / "fake" / "part" / "optim.bin").write_bytes(b"partitioN")  # a nested file is covered too
    assert verify(path) == "fake/part/optim.bin checksum mismatch"


def _cfg(*overrides: str):
    from dtrain.config import load_config

    return load_config(TINY, list(overrides))


def test_ds_config_is_generated_from_our_config():
    from dtrain.engine.deepspeed_engine import build_ds_config

    ds = build_ds_config(_cfg("train.engine=deepspeed", "train.batch_size=8", "train.comms_logger=true"), 4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 1)
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"] == {"stage": 0}
    assert ds["comms_logger"]["enabled"] is True
    # ZeRO-1: no gradient bucket (DeepSpeed's reduction never runs) and no norm all-reduce (DeepSpeed doesn't clip)
    ds = build_ds_config(_cfg("train.engine=deepspeed", "train.zero_stage=1"), 2)
    assert ds["zero_optimization"] == {"stage": 1, "contiguous_gradients": False, "compute_grad_norm": False}


def test_ds_config_merges_a_user_json(tmp_path: Path):
    from dtrain.engine.deepspeed_engine import build_ds_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"wall_clock_breakdown": True, "comms_logger": {"verbose": True},
                                "train_micro_batch_size_per_gpu": 4}))
    ds = build_ds_config(_cfg("train.engine=deepspeed", f"train.deepspeed_config={user}"), 2)
    assert ds["wall_clock_breakdown"] is True
    assert ds["comms_logger"] == {"enabled": False, "verbose": True, "prof_all": True}
    assert ds["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("content, message", [
    ({"train_batch_size": 16}, "inconsistent batch sizes"),
    ({"train_micro_batch_size_per_gpu": 2}, "inconsistent batch sizes"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2 is not supported"),
    ({"gradient_clipping": 1.0}, "must be 0"),
    ({"optimizer": {"type": "Adam"}}, "'optimizer' is not supported"),
    ({"bf16": {"enabled": True}}, "bf16 is not supported"),
    ({"zero_optimization": {"stage": 1}}, "differs from train.zero_stage=0"),
    ({"zero_optimization": {"overlap_comm": True}}, "overlap_comm=true is not supported"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer is not supported"),
    ("{not json", "is not valid JSON"),
])
def test_ds_config_refuses_what_would_bypass_the_trainer(tmp_path: Path, content, message):
    from dtrain.config import ConfigError
    from dtrain.engine.deepspeed_engine import build_ds_config

    user = tmp_path / "ds.json"
    user.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=message) as err:
        build_ds_config(_cfg("train.engine=deepspeed", f"train.deepspeed_config={user}"), 2)
    assert "\n" not in str(err.value)


def test_ds_config_missing_file_is_one_line():
    from dtrain.config import ConfigError
    from dtrain.engine.deepspeed_engine import build_ds_config

    with pytest.raises(ConfigError, match="file not found"):
        build_ds_config(_cfg("train.engine=deepspeed", "train.deepspeed_config=/nonexistent/ds.json"), 1)


@pytest.mark.parametrize("overrides, message", [
    (("comm.strategy=ddp",), "wraps the model"),
    (("comm.strategy=ddp-powersgd",), "wraps the model"),
    (("train.zero_stage=2",), "train.zero_stage=2 is not supported"),
    (("train.zero_stage=3",), "train.zero_stage=3 is not supported"),
    (("train.zero_stage=2", "comm.strategy=dad"), "ZeRO-2/3 partition gradients inside DeepSpeed"),
])
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
    agents = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env(NNODES="2", NODE_RANK=str(r), NPROC="2", MASTER_ADDR="127.0.0.1",
                                       PORT=str(port), MODE=mode, JOB_ID=f"test-{port}"))
              for r in (0, 1)]
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


def test_slurm_script_is_valid_bash_with_a_usage_header():
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "# usage: sbatch" in text and "srun" in text and "--rdzv-backend c10d" in text
    assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0


def test_torchrun_single_script_runs_a_job(tmp_path: Path, reference_w2: Path):
    run_dir = tmp_path / "single"
    run([str(LAUNCH / "torchrun_single.sh"), "2", TINY, "--set", "comm.strategy=allreduce", f"run.dir={run_dir}"])
    assert max_rel_diff(model_state(run_dir), model_state(reference_w2)) == 0.0


def test_hostfile_example_is_in_deepspeed_format():
    lines = [ln.split() for ln in (LAUNCH / "hostfile.example").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines and all(len(ln) == 2 and ln[1].startswith("slots=") and ln[1][6:].isdigit() for ln in lines)


def test_scripts_are_executable():
    for name in ("torchrun_single.sh", "torchrun_multinode.sh", "deepspeed.sh", "slurm.sbatch", "netns_cluster"):
        assert os.access(LAUNCH / name, os.X_OK), name
