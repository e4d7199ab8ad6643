"""bench/science_table.py's text_mlm pieces: the license corpus it copies, the context-free baseline, and the
perplexity table and corpus note of the report."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.science_table import (
    COMMON,
    LICENSES,
    TASKS,
    corpus_note,
    license_corpus,
    render_perplexity,
    t_interval,
    unigram_baseline,
)
from dtrain.config import load_config
from dtrain.data import IGNORE


def source_dir(tmp_path: Path) -> Path:
    src = tmp_path / "licenses"
    src.mkdir()
    (src / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE\n\nVersion 3\n")
    (src / "BSD").write_text("Redistribution and use\n")
    (src / "GPL").symlink_to("GPL-3")
    os.utime(src / "GPL-3", (1_000_000_000, 1_000_000_000))
    return src


def test_license_corpus_copies_every_file_as_txt(tmp_path):
    src = source_dir(tmp_path)
    dest = tmp_path / "out" / "corpus"
    (dest).mkdir(parents=True)
    (dest / "stale.txt").write_text("not a license")
    (dest / "notes.md").write_text("kept: not a .txt")
    assert license_corpus(dest, src) == dest
    assert sorted(p.name for p in dest.glob("*.txt")) == ["BSD.txt", "GPL-3.txt", "GPL.txt"]
    assert (dest / "GPL.txt").read_bytes() == (src / "GPL-3").read_bytes()  # the link's target, as a file
    assert not (dest / "GPL.txt").is_symlink() and (dest / "notes.md").exists()
    # the source's modification time, so dtrain's cache fingerprint (path, size, mtime) is the same on a rerun
    assert (dest / "GPL-3.txt").stat().st_mtime_ns == (src / "GPL-3").stat().st_mtime_ns
    before = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.txt")}
    (dest / "BSD.txt").write_text("edited")
    license_corpus(dest, src)
    assert (dest / "BSD.txt").read_bytes() == (src / "BSD").read_bytes()
    assert {p.name: p.stat().st_mtime_ns for p in dest.glob("*.txt")} == before
    assert not list(dest.glob("*.part"))


@pytest.mark.parametrize("make", [False, True])
def test_license_corpus_without_its_source_fails_in_one_line(tmp_path, make):
    missing = tmp_path / "common-licenses"
    if make:
        missing.mkdir()  # present but empty
    with pytest.raises(SystemExit) as err:
        license_corpus(tmp_path / "corpus", missing)
    message = str(err.value)
    assert str(missing) in message and "\n" not in message


def test_text_mlm_config(tmp_path):
    setup = TASKS["text_mlm"]
    if LICENSES.is_dir():  # the bench's own corpus, under its --out
        extra = setup.data(tmp_path)
        assert extra == [f"data.path={tmp_path / 'text_mlm' / 'corpus'}"]
        assert list((tmp_path / "text_mlm" / "corpus").glob("*.txt"))
    else:
        extra = [f"data.path={tmp_path}"]
    cfg = load_config(None, [*COMMON, *setup.sets, *extra])
    d = cfg.data
    assert (d.task, d.objective, d.tokenizer_kind, d.hf_dataset) == ("text", "mlm", "bpe", None)
    assert cfg.model.d_model == 32 and setup.lengths == ()


def test_unigram_baseline():
    # training tokens: 0 x4, 1 x2, 2 x1, 3 x1 (vocabulary 5: token 4 never occurs)
    train = np.array([[0, 0, 1, 2], [0, 0, 1, 3]])
    targets = torch.tensor([[0, IGNORE, 1, IGNORE], [IGNORE, 4, IGNORE, IGNORE], [0, IGNORE, IGNORE, IGNORE]])

    def batch(split, start, count):
        assert split == "val"
        return SimpleNamespace(targets=targets[start : start + count])

    spec = SimpleNamespace(vocab_size=5)
    task = SimpleNamespace(train=SimpleNamespace(tokens=train), spec=spec, n_val=3, batch=batch)
    acc, ppl = unigram_baseline(task)
    assert acc == pytest.approx(2 / 4)  # targets 0, 1, 4, 0: the most frequent token (0) twice
    p = {t: (c + 1) / (8 + 5) for t, c in {0: 4, 1: 2, 4: 0}.items()}
    want = math.exp(-(2 * math.log(p[0]) + math.log(p[1]) + math.log(p[4])) / 4)
    assert ppl == pytest.approx(want)


def text_result(model, seed, acc, ppl):
    return {
        "task": "text_mlm",
        "model": model,
        "seed": seed,
        "accuracy": {"64": acc},
        "held_out_iters": {"64": math.nan if model == "vanilla" else 4.0},
        "seconds": 1.0,
        "step_ms": 10.0,
        "perplexity": {"64": ppl},
        "corpus": {
            "files": 17,
            "bytes": 303_076,
            "train_blocks": 1347,
            "val_blocks": 165,
            "masked_per_block": 10,
            "vocab": 1024,
            "tokenizer_sha256": "ab" * 32,
            "unigram_acc": 0.0315,
            "unigram_perplexity": 402.17,
        },
    }


def test_render_perplexity_and_corpus_note():
    results = [text_result("vanilla", s, 0.1, 200.0 + s) for s in range(3)]
    results += [text_result("self", s, 0.1, 210.0 + 2 * s) for s in range(3)]
    lines = render_perplexity(results).strip().splitlines()
    _, half = t_interval([210.0, 212.0, 214.0])
    _, d_half = t_interval([10.0, 11.0, 12.0])
    assert lines[2] == "| text_mlm | 64 | vanilla | 201.0 ± 2.5 | 200.0 / 201.0 / 202.0 |  |"
    assert lines[3] == f"| text_mlm | 64 | self | 212.0 ± {half:.1f} | 210.0 / 212.0 / 214.0 | +11.0 ± {d_half:.1f} |"
    assert render_perplexity([{k: v for k, v in r.items() if k != "perplexity"} for r in results]) == ""
    note = corpus_note(results)
    assert "17 license texts" in note and "same in every run" in note and "NOT" not in note
    assert "1,347 training blocks and 165 held-out blocks of 64 tokens" in note and "scores 0.032" in note
    results[-1]["corpus"] = {**results[-1]["corpus"], "tokenizer_sha256": "cd" * 32}
    assert "NOT the same in every run" in corpus_note(results)
    assert corpus_note([{k: v for k, v in r.items() if k != "corpus"} for r in results]) == ""
