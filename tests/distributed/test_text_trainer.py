"""The text task through the real trainer (torchrun processes), on a directory of plain-text files and a
labelled JSONL file that the tests write (tests/helpers/text.py).

- masked-LM learns: validation perplexity at least halves against the untrained model within 200 steps (2 ranks,
  configs/text_mlm.yaml shrunk to fit a test);
- dad = allreduce (exact strategies, dropout 0) and 1 rank = 2 ranks on it: the world-size invariance of the
  text stream;
- classification from JSONL trains above chance."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dtrain import metrics as metric
from dtrain.config import load_config
from dtrain.data import build_task
from dtrain.distributed import DistEnv
from dtrain.model import build_model
from dtrain.trainer import evaluate
from tests.helpers.launch import ROOT, metrics, model_state, summary, train
from tests.helpers.oracles import max_rel_diff
from tests.helpers.text import write_reviews_jsonl, write_text_dir

TEXT_MLM = str(ROOT / "configs" / "text_mlm.yaml")
# configs/text_mlm.yaml at test size: the same model family and objective, smaller everywhere
SMALL = (
    "data.hf_dataset=null",
    "data.seq_len=32",
    "data.vocab_size=200",
    "data.n_val=64",
    "model.d_model=32",
    "model.n_layers=2",
    "model.d_ff=64",
    "model.dropout=0",
    "train.batch_size=16",
    "train.lr=3e-3",
    "train.warmup_steps=10",
    "eval.every=0",
    "checkpoint.every=0",
    "log.wandb=disabled",
    "log.progress=false",
)


def _common(tmp_path: Path, corpus: Path) -> tuple[str, ...]:
    return (*SMALL, f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}")


def _untrained_perplexity(overrides: tuple[str, ...]) -> float:
    cfg = load_config(TEXT_MLM, list(overrides))
    task = build_task(cfg.data)  # the cached tokenizer and arrays of the run
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, task.spec)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    return evaluate(model, task, cfg, env).perplexity


def test_masked_lm_on_text_files_halves_the_perplexity_in_200_steps(tmp_path):
    common = _common(tmp_path, write_text_dir(tmp_path / "corpus"))
    run = tmp_path / "mlm"
    train(run, *common, "train.steps=200", "eval.every=100", config=TEXT_MLM, nproc=2, timeout=400)
    trained = summary(run)[metric.FINAL_VAL_PERPLEXITY]
    before = _untrained_perplexity(common)
    assert trained < before / 2, (before, trained)
    evals = [r for r in metrics(run) if metric.VAL_PERPLEXITY in r]
    assert [r[metric.STEP] for r in evals] == [100, 200]
    assert (run / "tokenizer.json").is_file()


def test_text_dad_equals_allreduce_and_one_rank_equals_two(tmp_path):
    common = (*_common(tmp_path, write_text_dir(tmp_path / "corpus")), "train.steps=12")
    runs = {}
    for strategy, nproc in (("allreduce", 2), ("dad", 2), ("allreduce", 1)):
        runs[strategy, nproc] = tmp_path / f"{strategy}-w{nproc}"
        train(runs[strategy, nproc], *common, f"comm.strategy={strategy}", config=TEXT_MLM, nproc=nproc)
    reference = model_state(runs["allreduce", 2])
    assert max_rel_diff(reference, model_state(runs["dad", 2])) < 1e-5
    assert max_rel_diff(reference, model_state(runs["allreduce", 1])) < 1e-5
    # the same tokenizer in every run (trained once, then read from the cache)
    tokenizers = {(run / "tokenizer.json").read_text() for run in runs.values()}
    assert len(tokenizers) == 1


def test_classification_from_jsonl_trains_above_chance(tmp_path):
    data = write_reviews_jsonl(tmp_path / "reviews.jsonl", n=600)
    common = (*_common(tmp_path, data), "data.objective=classification", "data.seq_len=48", "train.steps=80")
    run = tmp_path / "cls"
    train(run, *common, config=TEXT_MLM, nproc=2)
    assert summary(run)[metric.FINAL_VAL_ACC] > 0.75  # two balanced classes: chance is 0.5
    assert metric.FINAL_VAL_PERPLEXITY not in summary(run)


def test_text_batches_are_the_same_through_data_workers(tmp_path):
    """The task crosses into DataLoader worker processes (its memory maps reopened there) unchanged."""
    common = (*_common(tmp_path, write_text_dir(tmp_path / "corpus")), "train.steps=4")
    losses = {}
    for workers in (0, 2):
        run = tmp_path / f"workers{workers}"
        train(run, *common, f"data.workers={workers}", config=TEXT_MLM, nproc=1)
        losses[workers] = [r[metric.TRAIN_LOSS] for r in metrics(run) if metric.TRAIN_LOSS in r]
    assert len(losses[0]) == 4 and losses[0] == losses[2]


def test_a_resumed_text_run_uses_the_tokenizer_it_started_with(tmp_path):
    """The resumed run reads tokenizer.json from its run directory, even when the cache that holds the trained
    tokenizer is gone (training it again would give another WordPiece vocabulary), and ends where an
    uninterrupted run ends."""
    common = (*_common(tmp_path, write_text_dir(tmp_path / "corpus")), "train.steps=6", "checkpoint.every=3")
    full, part = tmp_path / "full", tmp_path / "part"
    train(full, *common, config=TEXT_MLM, nproc=2)
    fault = {"DTRAIN_FAULT": "kill@train:step=4,rank=0"}
    proc = train(part, *common, config=TEXT_MLM, nproc=2, extra_env=fault, check=False)
    assert proc.returncode != 0 and not (part / "model.pt").exists()
    started_with = (part / "tokenizer.json").read_text()
    shutil.rmtree(tmp_path / "cache")
    train(part, *common, config=TEXT_MLM, nproc=2, resume=True)
    assert (part / "tokenizer.json").read_text() == started_with
    assert max_rel_diff(model_state(full), model_state(part)) < 1e-5


def test_hf_bert_with_fpsa_trains_on_text_through_dtrain_train(tmp_path):
    """model.family=hf-bert: a Hugging Face BERT of configs/text_mlm.yaml's (shrunk) sizes, FPSA swapped into its
    self-attention, trained by `dtrain train` on 2 ranks with dad; its FPSA figures reach metrics.jsonl."""
    pytest.importorskip("transformers")
    common = (*_common(tmp_path, write_text_dir(tmp_path / "corpus")), "train.steps=6", "model.family=hf-bert")
    run = tmp_path / "bert"
    train(run, *common, "comm.strategy=dad", config=TEXT_MLM, nproc=2)
    rows = [r for r in metrics(run) if metric.TRAIN_LOSS in r]
    assert len(rows) == 6 and rows[-1][metric.TRAIN_LOSS] < rows[0][metric.TRAIN_LOSS]
    assert metric.FPSA_ITERS_MEAN in rows[-1]
    assert summary(run)[metric.FINAL_VAL_PERPLEXITY] > 1
