"""Bad text input: one clear line (the file, the field, what was expected), exit code 2, and nothing written into
the run directory that was already there. Each case runs `dtrain train` in this process (world size 1)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dtrain.cli import main
from tests.helpers.launch import TINY
from tests.helpers.text import write_reviews_jsonl, write_text_dir


def _missing(tmp: Path) -> list[str]:
    return [f"data.path={tmp / 'nowhere'}"]


def _empty(tmp: Path) -> list[str]:
    (tmp / "empty.txt").write_text("\n\n")
    return [f"data.path={tmp / 'empty.txt'}"]


def _no_glob_match(tmp: Path) -> list[str]:
    write_text_dir(tmp / "corpus")
    return [f"data.path={tmp / 'corpus' / '*.jsonl'}"]


def _wrong_field(tmp: Path) -> list[str]:
    path = write_reviews_jsonl(tmp / "reviews.jsonl", n=20, text_field="body")
    return [f"data.path={path}"]


def _not_utf8(tmp: Path) -> list[str]:
    (tmp / "latin1.txt").write_bytes("Caf\xe9 au lait, na\xefve r\xe9sum\xe9.\n".encode("latin-1"))
    return [f"data.path={tmp / 'latin1.txt'}"]


def _csv_row_without_label(tmp: Path) -> list[str]:
    (tmp / "labels.csv").write_text("text,label\ngood film,pos\nbad film,\nfine film,pos\n")
    return [f"data.path={tmp / 'labels.csv'}", "data.objective=classification"]


def _unknown_dataset_offline(tmp: Path) -> list[str]:
    return ["data.path=null", "data.hf_dataset=no-such-owner/no-such-dataset-xyz"]


def _tokenizer_missing(tmp: Path) -> list[str]:
    return [f"data.path={write_text_dir(tmp / 'corpus')}", f"data.tokenizer={tmp / 'tok' / 'tokenizer.json'}"]


CASES = {
    "missing-path": (_missing, r"data\.path: .*nowhere does not exist"),
    "empty-file": (_empty, r"data\.path: .*empty\.txt is empty"),
    "no-glob-match": (_no_glob_match, r"data\.path: no .* files match the glob '.*\*\.jsonl'"),
    "wrong-field": (
        _wrong_field,
        r"reviews\.jsonl line 1: no field 'text' \(fields: body, label\); set data\.text_field",
    ),
    "not-utf8": (_not_utf8, r"latin1\.txt is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    "csv-row-without-label": (_csv_row_without_label, r"labels\.csv row 3: no label \(field 'label' is empty\)"),
    "unknown-dataset-offline": (_unknown_dataset_offline, r"data\.hf_dataset: cannot load 'no-such-owner/.*offline"),
    "tokenizer-missing": (_tokenizer_missing, r"data\.tokenizer: .*tokenizer\.json does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_text_input_is_one_line_exit_2_and_leaves_the_run_directory_alone(tmp_path, capsys, case):
    if case == "unknown-dataset-offline":
        pytest.importorskip("datasets")
    make, message = CASES[case]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")  # an earlier run's files
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    overrides = ["data.task=text", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run}", *make(tmp_path)]
    code = main(["train", "--config", TINY, "--set", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dtrain: error: "), err
    assert re.search(message, err[0]), err[0]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
