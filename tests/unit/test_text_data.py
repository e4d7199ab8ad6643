"""The text task in one process: sources, held-out documents, BERT masking, the cache, tokenizers, the splits."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain.config import load_config
from dtrain.data import IGNORE, build_task
from dtrain.data.text import TOKENIZER_FILE, masked_positions
from dtrain.data.text import tokenizer as tokenizer_mod
from dtrain.data.text.sources import DataError, Documents, split_documents
from tests.helpers.text import write_reviews_jsonl, write_text_dir


def text_cfg(tmp_path: Path, *overrides: str):
    base = [
        "data.task=text",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.seq_len=16",
        "data.vocab_size=120",
        "data.n_val=64",
    ]
    if not any(o.startswith(("data.path=", "data.hf_dataset=")) for o in overrides):
        base.append(f"data.path={write_text_dir(tmp_path / 'corpus')}")
    return load_config(None, base + list(overrides)).data


def test_masked_lm_masks_exactly_m_positions_with_bert_proportions(tmp_path):
    cfg = text_cfg(tmp_path, "data.seq_len=40")
    task = build_task(cfg)
    m = masked_positions(cfg)
    assert m == 6 and task.spec.targets_per_example == m and task.spec.per_token and task.spec.reports_perplexity
    b = task.batch("train", 0, 400)
    original = torch.from_numpy(np.asarray(task.train.tokens[task.rows("train", 0, 400)], dtype=np.int64))
    targeted = b.targets != IGNORE
    assert (targeted.sum(1) == m).all()
    assert torch.equal(b.targets[targeted], original[targeted])  # the targets are the original tokens
    assert torch.equal(b.tokens[~targeted], original[~targeted])  # untouched elsewhere
    at = b.tokens[targeted]
    masked = (at == task.specials.mask).float().mean().item()
    kept = (at == original[targeted]).float().mean().item()
    assert 0.76 < masked < 0.84 and 0.07 < kept < 0.14  # 80% [MASK]; 10% kept (+ random draws of the same token)
    random_ids = at[(at != task.specials.mask) & (at != original[targeted])]
    assert len(random_ids) and not set(random_ids.tolist()) & set(task.specials.all_ids)


def test_batches_do_not_depend_on_how_they_are_split(tmp_path):
    task = build_task(text_cfg(tmp_path))
    n = len(task.train)
    whole = task.batch("train", n - 5, 10)  # crosses into the second pass
    parts = [task.batch("train", n - 5, 3), task.batch("train", n - 2, 7)]
    for field in ("tokens", "targets", "mask"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(p, field) for p in parts]))
    # a new order and new masks on the next pass; validation masks are fixed
    first, second = task.batch("train", 0, n), task.batch("train", n, n)
    assert not torch.equal(first.tokens, second.tokens)
    assert torch.equal(task.batch("val", 3, 4).tokens, task.batch("val", 0, 8).tokens[3:7])


def test_validation_documents_are_never_trained_on(tmp_path):
    cfg = text_cfg(tmp_path)
    task = build_task(cfg)
    from dtrain.data.text.sources import FileSource

    corpus = FileSource(cfg).read()
    assert corpus.val.texts and not set(corpus.val.texts) & set(corpus.train.texts)
    assert task.meta["val_documents"] == len(corpus.val.texts)
    # the held-out rule follows the document, not its position: reordering keeps each document's side
    docs = Documents(texts=[f"document {i} with words" for i in range(200)])
    a = split_documents(docs, seed=3, fraction=0.2, what="x")
    b = split_documents(Documents(texts=docs.texts[::-1]), seed=3, fraction=0.2, what="x")
    assert set(a.val.texts) == set(b.val.texts) and 20 < len(a.val.texts) < 60
    assert set(split_documents(docs, seed=4, fraction=0.2, what="x").val.texts) != set(a.val.texts)


def test_cache_is_built_once_and_keyed_by_the_files(tmp_path, monkeypatch):
    cfg = text_cfg(tmp_path)
    first = build_task(cfg)
    calls = []
    monkeypatch.setattr(tokenizer_mod.Tokenizer, "encode_batch", lambda *a, **k: calls.append(1) or [])
    monkeypatch.setattr("dtrain.data.text.train_tokenizer", lambda *a: calls.append(2))
    again = build_task(cfg)  # neither trained nor tokenised again: read from the cache
    assert calls == [] and again.directory == first.directory
    assert torch.equal(again.batch("train", 0, 8).tokens, first.batch("train", 0, 8).tokens)
    monkeypatch.undo()
    path = Path(cfg.path) / "part0.txt"
    path.write_text(path.read_text() + "\n\nA new paragraph about the tall tree.\n")
    changed = build_task(cfg)
    assert changed.directory != first.directory


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_truncate, r"train_tokens\.npy has \d+ bytes, expected \d+"),
        (_flip_one_byte, r"train_tokens\.npy checksum mismatch"),
        (lambda path: (path.parent / "manifest.json").unlink(), r"no manifest\.json"),
    ],
    ids=["truncated", "corrupted", "no-manifest"],
)
def test_a_damaged_cache_entry_is_rebuilt_with_one_line(tmp_path, capsys, damage, reason):
    cfg = text_cfg(tmp_path)
    first = build_task(cfg)
    expected = first.batch("train", 0, 8).tokens
    damage(first.directory / "train_tokens.npy")
    capsys.readouterr()
    again = build_task(cfg)
    lines = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and re.search(r"the cache entry .* is damaged \(" + reason + r"\); rebuilding it", lines[0])
    assert again.directory == first.directory and torch.equal(again.batch("train", 0, 8).tokens, expected)


def test_a_different_tokenizer_on_resume_is_refused_in_one_line(tmp_path):
    cfg = text_cfg(tmp_path)
    started = build_task(cfg)
    run = tmp_path / "run"
    run.mkdir()
    (run / TOKENIZER_FILE).write_text(started.tokenizer_json)
    (tmp_path / "same.json").write_text(started.tokenizer_json)
    assert build_task(text_cfg(tmp_path, f"data.tokenizer={tmp_path / 'same.json'}"), run).tokenizer_json == (
        started.tokenizer_json
    )
    other = tokenizer_mod.train_tokenizer(["the cat sees a red ball"] * 20, "wordpiece", 80)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(
        DataError, match=r"data\.tokenizer .*other\.json is not the tokenizer this run started with"
    ) as err:
        build_task(text_cfg(tmp_path, f"data.tokenizer={tmp_path / 'other.json'}"), run)
    assert "\n" not in str(err.value)


def test_a_resumed_run_reuses_the_tokenizer_of_its_run_directory(tmp_path):
    cfg = text_cfg(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    other = tokenizer_mod.train_tokenizer(["completely different words here"] * 5, "bpe", 300).to_str()
    (run / TOKENIZER_FILE).write_text(other)
    resumed = build_task(cfg, run)
    assert resumed.tokenizer_json == other and resumed.run_files() == {TOKENIZER_FILE: other}
    fresh = build_task(cfg)
    assert fresh.tokenizer_json != other


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_a_tokenizer_file_or_directory_is_used_as_given(tmp_path, kind):
    tok = tokenizer_mod.train_tokenizer(["the cat sees a red ball"] * 20, kind, 80)
    (tmp_path / "tokdir").mkdir()
    tok.save(str(tmp_path / "tokdir" / "tokenizer.json"))
    for where in (tmp_path / "tokdir", tmp_path / "tokdir" / "tokenizer.json"):
        task = build_task(text_cfg(tmp_path, f"data.tokenizer={where}", f"data.tokenizer_kind={kind}"))
        assert (
            tokenizer_mod.from_json(task.tokenizer_json).to_str() == tok.to_str()
            and task.spec.vocab_size == tok.get_vocab_size()
        )


def test_transformers_tokenizer_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = tokenizer_mod.train_tokenizer(["the cat sees a red ball"] * 20, "wordpiece", 80)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", pad_token="[PAD]")
    fast.save_pretrained(tmp_path / "hf-tok")
    task = build_task(text_cfg(tmp_path, f"data.tokenizer={tmp_path / 'hf-tok'}"))
    assert task.specials.mask == tok.token_to_id("[MASK]")


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_classification_from_jsonl_csv_and_parquet_gives_the_same_examples(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    jsonl = write_reviews_jsonl(tmp_path / "reviews.jsonl", n=120)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    (tmp_path / "csv").mkdir()
    _write_csv(tmp_path / "csv" / "reviews.csv", rows)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / "reviews.parquet")
    common = ("data.objective=classification", "data.seq_len=64")
    tasks = [build_task(text_cfg(tmp_path, f"data.path={jsonl}", *common))]
    # one tokenizer for all three (WordPiece training breaks ties differently from run to run)
    (tmp_path / "tokenizer.json").write_text(tasks[0].tokenizer_json)
    for p in (tmp_path / "csv", tmp_path / "pq"):
        tasks.append(
            build_task(text_cfg(tmp_path, f"data.path={p}", f"data.tokenizer={tmp_path / 'tokenizer.json'}", *common))
        )
    spec = tasks[0].spec
    assert (spec.num_classes, spec.per_token, spec.targets_per_example) == (2, False, 1)
    assert tasks[0].meta["classes"] == ["neg", "pos"]
    b = tasks[0].batch("train", 0, 16)
    assert b.targets.shape == (16,) and set(b.targets.tolist()) <= {0, 1}
    assert (~b.mask).any() and (b.tokens[~b.mask] == spec.pad_id).all()  # short reviews are padded
    for other in tasks[1:]:
        assert torch.equal(other.batch("train", 0, 16).tokens, b.tokens)
        assert torch.equal(other.batch("val", 0, 8).targets, tasks[0].batch("val", 0, 8).targets)


def test_hugging_face_dataset_from_disk_with_and_without_a_validation_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [p for p in (write_text_dir(tmp_path / "c").joinpath("part0.txt").read_text().split("\n\n")) if p.strip()]
    half = len(texts) // 2
    ds = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": texts[:half] + [""]}),  # WikiText-style empty rows are dropped
        validation=datasets.Dataset.from_dict({"text": texts[half:]}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    task = build_task(text_cfg(tmp_path, f"data.hf_dataset={tmp_path / 'ds'}"))
    assert task.meta["train_documents"] == half and task.meta["val_documents"] == len(texts) - half
    only_train = build_task(text_cfg(tmp_path, f"data.hf_dataset={tmp_path / 'ds'}", "data.val_split=test"))
    assert only_train.meta["train_documents"] + only_train.meta["val_documents"] == half  # held out of train


def test_unknown_dataset_offline_is_one_clear_line(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match=r"cannot load 'no-such-user/no-such-dataset'.*offline") as err:
        build_task(text_cfg(tmp_path, "data.hf_dataset=no-such-user/no-such-dataset"))
    assert "\n" not in str(err.value)
