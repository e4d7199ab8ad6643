"""Where the text comes from: files under `data.path` or a Hugging Face dataset, as documents with labels.

A source is read in two steps. `fingerprint()` is cheap (file names, sizes and modification times, or the
dataset's own fingerprint) and keys the caches; `read()` returns the documents of both splits and is only called
when a cache misses. Every problem a user can fix is a `DataError`: one line naming the file (and line or row),
the field and what was expected.

Documents: a `.txt` file holds one document per paragraph (paragraphs are separated by blank lines, as in
WikiText); a `.jsonl` line, a `.csv` row and a `.parquet` row hold one document each, in `data.text_field`, with
its label in `data.label_field` (classification only). Where the source has no validation split (always for
`data.path`), a seeded `data.val_fraction` of the DOCUMENTS is held out, chosen by a keyed hash of each document's
text, so no block of a validation document is ever trained on and adding files does not move old documents.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtrain.config import ConfigError, DataConfig

#: the file types `data.path` reads
SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")


class DataError(ConfigError):
    """Bad data input: the message is one line for the user (exit code 2, like any ConfigError)."""


@dataclass
class Documents:
    """The documents of one split, and their labels (None for masked-LM)."""

    texts: list[str] = field(default_factory=list)
    labels: list[Any] | None = None


@dataclass
class Corpus:
    train: Documents
    val: Documents


def _wants_labels(cfg: DataConfig) -> bool:
    return cfg.objective == "classification"


# ---------------------------------------------------------------------------------------------- files


def resolve_files(path: str) -> list[Path]:
    """The files `data.path` names: itself, every supported file below a directory, or a glob's matches."""
    if any(ch in path for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(path), recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix in SUFFIXES]
        if not files:
            raise DataError(f"data.path: no {', '.join(SUFFIXES)} files match the glob {path!r}")
        return files
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"data.path: the directory {p} holds no {', '.join(SUFFIXES)} files")
        return files
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise DataError(f"data.path: {p} has the unsupported type {p.suffix!r}; expected {', '.join(SUFFIXES)}")
        return [p]
    raise DataError(f"data.path: {p} does not exist")


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"data.path: {path} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"data.path: {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "re-encode it as UTF-8"
        ) from None


def _field(record: dict[str, Any], name: str, key: str, where: str) -> Any:
    if name not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: no field {name!r} (fields: {fields}); set data.{key}")
    return record[name]


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} holds {type(value).__name__}, expected text")
    return value


def _label(value: Any, where: str, name: str) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: no label (field {name!r} is empty)")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (str, int, bool)):
        raise DataError(f"{where}: label {value!r} in field {name!r} is not a string or an integer")
    return value


def _records(path: Path, cfg: DataConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) of every row of a .jsonl, .csv or .parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises its own types for a damaged or non-parquet file
            raise DataError(f"data.path: {path} is not a readable parquet file ({err})") from None
        if table.num_rows == 0:
            raise DataError(f"data.path: {path} is empty")
        for i, row in enumerate(table.to_pylist(), start=1):
            yield f"data.path: {path} row {i}", row
        return
    text = _decode(path)
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"data.path: {path} line {i} is not valid JSON") from None
            if not isinstance(record, dict):
                raise DataError(f"data.path: {path} line {i} is not a JSON object")
            yield f"data.path: {path} line {i}", record
        return
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise DataError(f"data.path: {path} is empty")
    for i, row in enumerate(reader, start=2):  # line 1 is the header
        yield f"data.path: {path} row {i}", {k: v for k, v in row.items() if k is not None}


def read_file(path: Path, cfg: DataConfig) -> Documents:
    labelled = _wants_labels(cfg)
    docs = Documents(labels=[] if labelled else None)
    if path.suffix == ".txt":
        if labelled:
            raise DataError(
                f"data.path: {path} is plain text, which has no labels; data.objective=classification reads "
                ".jsonl, .csv or .parquet files with a label field"
            )
        docs.texts = [p.strip() for p in _decode(path).replace("\r\n", "\n").split("\n\n") if p.strip()]
    else:
        for where, record in _records(path, cfg):
            docs.texts.append(_text(_field(record, cfg.text_field, "text_field", where), where, cfg.text_field))
            if labelled:
                label = _field(record, cfg.label_field, "label_field", where)
                docs.labels.append(_label(label, where, cfg.label_field))
    if not any(t.strip() for t in docs.texts):
        raise DataError(f"data.path: {path} holds no text")
    return docs


def held_out(text: str, seed: int, fraction: float) -> bool:
    """Whether a document (by its text) belongs to the validation share: a keyed hash, stable per document."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=f"dtrain-val-{seed}".encode()).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def split_documents(docs: Documents, seed: int, fraction: float, what: str) -> Corpus:
    """Hold out the seeded share of documents; at least one on each side."""
    if len(docs.texts) < 2:
        raise DataError(f"{what}: {len(docs.texts)} document(s) cannot be split into training and validation")
    flags = [held_out(t, seed, fraction) for t in docs.texts]
    if not any(flags):  # a tiny corpus whose hashes all fell on one side: move one document across
        flags[0] = True
    elif all(flags):
        flags[-1] = False
    labelled = docs.labels is not None
    corpus = Corpus(Documents(labels=[] if labelled else None), Documents(labels=[] if labelled else None))
    for i, (text, val) in enumerate(zip(docs.texts, flags)):
        side = corpus.val if val else corpus.train
        side.texts.append(text)
        if docs.labels is not None:
            side.labels.append(docs.labels[i])
    return corpus


class FileSource:
    """The files under `data.path`."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.files = resolve_files(cfg.path)
        self._corpus: Corpus | None = None

    def fingerprint(self) -> dict[str, Any]:
        stats = [(str(p.resolve()), st.st_size, st.st_mtime_ns) for p in self.files for st in [p.stat()]]
        return {"files": stats}

    def read(self) -> Corpus:
        """The documents of both splits (read once per source object)."""
        if self._corpus is None:
            self._corpus = self._read()
        return self._corpus

    def _read(self) -> Corpus:
        every = Documents(labels=[] if _wants_labels(self.cfg) else None)
        for path in self.files:
            docs = read_file(path, self.cfg)
            every.texts += docs.texts
            if every.labels is not None:
                every.labels += docs.labels
        return split_documents(every, self.cfg.seed, self.cfg.val_fraction, f"data.path {self.cfg.path}")


# ---------------------------------------------------------------------------------------------- Hugging Face


def _offline(online: bool) -> None:
    """The datasets library's and the Hub's offline switches, set before (and after) `datasets` is imported."""
    value = "0" if online else "1"
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = value
    try:
        import datasets.config
        import huggingface_hub.constants
    except ImportError:
        return
    datasets.config.HF_DATASETS_OFFLINE = datasets.config.HF_HUB_OFFLINE = not online
    huggingface_hub.constants.HF_HUB_OFFLINE = not online


class HubSource:
    """`data.hf_dataset`: a `save_to_disk` directory, or a name for `datasets.load_dataset` (offline unless
    `data.online`; a dataset already in the local Hugging Face cache loads offline)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        _offline(cfg.online)
        try:
            import datasets
        except ImportError:
            raise DataError("data.hf_dataset needs the datasets library: pip install 'dtrain[hf]'") from None
        name = cfg.hf_dataset
        try:
            if Path(name).expanduser().is_dir():
                loaded = datasets.load_from_disk(str(Path(name).expanduser()))
            else:
                loaded = datasets.load_dataset(name, cfg.hf_config)
        except Exception as err:  # the library raises many types (missing, offline, bad config name)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            hint = (
                ""
                if cfg.online
                else "; offline, only local directories and cached datasets load (data.online=true downloads)"
            )
            raise DataError(f"data.hf_dataset: cannot load {name!r}: {first[:200]}{hint}") from None
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({cfg.train_split: loaded})
        if cfg.train_split not in loaded:
            raise DataError(
                f"data.train_split: {name!r} has no split {cfg.train_split!r} (splits: {', '.join(loaded)})"
            )
        self.splits = loaded
        self._corpus: Corpus | None = None
        self.val_split = cfg.val_split if cfg.val_split in loaded else None
        for split in (cfg.train_split, self.val_split):
            if split is None:
                continue
            columns = loaded[split].column_names
            wanted = [("text_field", cfg.text_field)]
            if _wants_labels(cfg):
                wanted.append(("label_field", cfg.label_field))
            for key, column in wanted:
                if column not in columns:
                    raise DataError(
                        f"data.{key}: {name!r} split {split!r} has no column {column!r} (columns: {', '.join(columns)})"
                    )

    def fingerprint(self) -> dict[str, Any]:
        splits = [self.cfg.train_split] + ([self.val_split] if self.val_split else [])
        return {"hf_dataset": self.cfg.hf_dataset, "splits": {s: self.splits[s]._fingerprint for s in splits}}

    def _documents(self, split: str) -> Documents:
        data = self.splits[split]
        texts = [t for t in data[self.cfg.text_field]]
        where = f"data.hf_dataset {self.cfg.hf_dataset!r} split {split!r}"
        for i, t in enumerate(texts):
            _text(t, f"{where} row {i}", self.cfg.text_field)
        labels = None
        if _wants_labels(self.cfg):
            labels = [
                _label(v, f"{where} row {i}", self.cfg.label_field) for i, v in enumerate(data[self.cfg.label_field])
            ]
        if labels is None:  # masked-LM: WikiText-style datasets hold one paragraph or an empty line per row
            texts = [t for t in texts if t.strip()]
        return Documents(texts, labels)

    def read(self) -> Corpus:
        """The documents of both splits (read once per source object)."""
        if self._corpus is None:
            self._corpus = self._read()
        return self._corpus

    def _read(self) -> Corpus:
        train = self._documents(self.cfg.train_split)
        if self.val_split is None:
            return split_documents(
                train, self.cfg.seed, self.cfg.val_fraction, f"data.hf_dataset {self.cfg.hf_dataset!r}"
            )
        return Corpus(train, self._documents(self.val_split))


def open_source(cfg: DataConfig) -> FileSource | HubSource:
    return FileSource(cfg) if cfg.path is not None else HubSource(cfg)
