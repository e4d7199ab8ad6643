"""`data.task: text`: masked-LM or classification over your documents (docs/data.md).

    source (sources.py)  ->  tokenizer (tokenizer.py)  ->  tokenised arrays (cache.py)  ->  TextTask

Masked-LM (`data.objective: mlm`): each split's documents are encoded, joined with the separator token and cut
into blocks of `data.seq_len` tokens (the remainder is dropped); training and validation blocks come from
different documents. Every block predicts exactly m = round(data.mask_prob x seq_len) positions (at least one),
as the original BERT does: of those, 80% become the mask token, 10% a random ordinary token, 10% stay. The mask is
drawn from (data.seed, split, stream index), so a block is masked anew on every pass through the training data
while validation masks are fixed, and the loss (summed over the m targets, divided by m per example) is the mean
cross-entropy of the masked tokens: val/perplexity = exp(val/loss).

Classification (`data.objective: classification`): each document is truncated to seq_len tokens and padded; its
label becomes a class index (the sorted distinct training labels). difficulty = ⌈log2(tokens)⌉, so the report's
per-difficulty plots show how length matters.

Who does what when several ranks start: every rank opens the source (so a bad path fails everywhere with the same
line), rank 0 alone trains the tokenizer and hands its JSON to the others (`share`), and the tokenised arrays are
built under a file lock by the first rank of each machine that needs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.config import DataConfig

from ..tasks import _SPLIT_CODE, IGNORE, ArrayTask, ExampleArrays, Split, TaskSpec
from . import cache
from .sources import Corpus, DataError, Documents, open_source
from .tokenizer import Specials, check_for, digest, from_json, load_tokenizer_json, train_tokenizer

#: the file a run directory keeps its tokenizer in (a resumed run reads it back)
TOKENIZER_FILE = "tokenizer.json"

__all__ = ["DataError", "TOKENIZER_FILE", "TextTask", "build_text_task"]


def masked_positions(cfg: DataConfig) -> int:
    return max(1, round(cfg.mask_prob * cfg.seq_len))


class TextTask(ArrayTask):
    """The arrays of one cache entry as a task. Pickles as its entry's path (workers reopen the memory maps)."""

    def __init__(self, cfg: DataConfig, directory: Path, tokenizer_json: str, specials: Specials) -> None:
        self.cfg, self.directory, self.tokenizer_json, self.specials = cfg, directory, tokenizer_json, specials
        self.meta = json.loads((directory / "meta.json").read_text())
        vocab = self.meta["vocab_size"]
        if cfg.objective == "mlm":
            self.n_masked = masked_positions(cfg)
            spec = TaskSpec(
                name="text-mlm",
                vocab_size=vocab,
                seq_len=cfg.seq_len,
                num_classes=vocab,
                per_token=True,
                targets_per_example=self.n_masked,
                pad_id=None,
                reports_perplexity=True,
            )
            self.ordinary = np.setdiff1d(np.arange(vocab), np.asarray(specials.all_ids, dtype=np.int64))
        else:
            spec = TaskSpec(
                name="text-classification",
                vocab_size=vocab,
                seq_len=cfg.seq_len,
                num_classes=len(self.meta["classes"]),
                per_token=False,
                targets_per_example=1,
                pad_id=specials.pad,
            )
        train, val = (self._open(split) for split in ("train", "val"))
        super().__init__(spec, cfg.seed, train, val, cfg.n_val)

    def _open(self, split: str) -> ExampleArrays:
        tokens = np.load(self.directory / f"{split}_tokens.npy", mmap_mode="r")
        if self.cfg.objective == "mlm":  # the targets are the tokens themselves, where masked (`examples`)
            return ExampleArrays(tokens, tokens, np.zeros(len(tokens), dtype=np.int64))
        labels = np.load(self.directory / f"{split}_labels.npy", mmap_mode="r")
        difficulty = np.load(self.directory / f"{split}_difficulty.npy", mmap_mode="r")
        return ExampleArrays(tokens, labels, difficulty)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("train", "val", "_order")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.train, self.val, self._order = self._open("train"), self._open("val"), None

    def examples(self, split: Split, rows: np.ndarray, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        tokens, targets = super().examples(split, rows, stream)
        tokens = tokens.astype(np.int64)
        if self.cfg.objective != "mlm":
            return tokens, targets.astype(np.int64)
        masked = tokens.copy()
        targets = np.full_like(tokens, IGNORE)
        length, m = tokens.shape[1], self.n_masked
        for row, index in enumerate(stream):
            rng = np.random.default_rng([self.seed % 2**63, _SPLIT_CODE[split], int(index), 15])
            where = rng.choice(length, size=m, replace=False)
            kind = rng.random(m)
            replacement = self.ordinary[rng.integers(len(self.ordinary), size=m)]
            targets[row, where] = tokens[row, where]
            masked[row, where[kind < 0.8]] = self.specials.mask
            swap = (kind >= 0.8) & (kind < 0.9)
            masked[row, where[swap]] = replacement[swap]
        return masked, targets

    def run_files(self) -> dict[str, str]:
        return {TOKENIZER_FILE: self.tokenizer_json}


# ---------------------------------------------------------------------------------------------- building


def _blocks(ids: list[list[int]], sep: int | None, length: int) -> np.ndarray:
    stream: list[int] = []
    for doc in ids:
        stream += doc
        if sep is not None:
            stream.append(sep)
    n = len(stream) // length
    return np.asarray(stream[: n * length], dtype=np.int64).reshape(n, length)


def _padded(ids: list[list[int]], pad: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.full((len(ids), length), pad, dtype=np.int64)
    lengths = np.zeros(len(ids), dtype=np.int64)
    for i, doc in enumerate(ids):
        doc = doc[:length]
        tokens[i, : len(doc)] = doc
        lengths[i] = len(doc)
    return tokens, lengths


def _classes(train: Documents, val: Documents, what: str) -> list[Any]:
    classes = sorted(set(train.labels), key=lambda v: (type(v).__name__, v))
    if len(classes) < 2:
        raise DataError(f"{what}: the training split has {len(classes)} distinct label(s); classification needs 2")
    unseen = set(val.labels) - set(classes)
    if unseen:
        raise DataError(f"{what}: validation labels {sorted(map(str, unseen))[:5]} never occur in the training split")
    return classes


def _write_arrays(
    out: Path, corpus: Corpus, tokenizer_json: str, specials: Specials, cfg: DataConfig, what: str
) -> None:
    tok = from_json(tokenizer_json)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.int32
    meta: dict[str, Any] = {"vocab_size": vocab, "objective": cfg.objective, "seq_len": cfg.seq_len}
    classes = _classes(corpus.train, corpus.val, what) if cfg.objective == "classification" else None
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        cache.say(f"tokenising {len(docs.texts):,} {split} documents of {what}")
        ids = [e.ids for e in tok.encode_batch(docs.texts, add_special_tokens=False)]
        if cfg.objective == "mlm":
            tokens = _blocks(ids, specials.sep, cfg.seq_len)
            if len(tokens) == 0:
                raise DataError(
                    f"{what}: the {split} split has {sum(map(len, ids)):,} tokens, fewer than one block of "
                    f"data.seq_len={cfg.seq_len}; use more text or a shorter data.seq_len"
                )
        else:
            keep = [i for i, doc in enumerate(ids) if doc]
            tokens, lengths = _padded([ids[i] for i in keep], specials.pad, cfg.seq_len)
            index = {c: i for i, c in enumerate(classes)}
            np.save(out / f"{split}_labels.npy", np.asarray([index[docs.labels[i]] for i in keep], dtype=np.int64))
            np.save(out / f"{split}_difficulty.npy", np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64))
        np.save(out / f"{split}_tokens.npy", tokens.astype(dtype))
        meta[f"{split}_examples"] = len(tokens)
        meta[f"{split}_documents"] = len(docs.texts)
    if classes is not None:
        meta["classes"] = classes
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def _trained_tokenizer(cfg: DataConfig, source, fingerprint: dict[str, Any], run_dir: Path | None) -> str:
    """Rank 0: the resumed run's tokenizer, else a cached one trained on the same data, else a new one."""
    if run_dir is not None and (run_dir / TOKENIZER_FILE).is_file():
        return (run_dir / TOKENIZER_FILE).read_text()
    parts = {"source": fingerprint, "kind": cfg.tokenizer_kind, "vocab_size": cfg.vocab_size, "seed": cfg.seed}
    parts.update(val_fraction=cfg.val_fraction, fields=[cfg.text_field, cfg.label_field], objective=cfg.objective)
    path = cache.cache_root(cfg) / "tokenizers" / f"{cache.key_of(parts)}.json"

    def train() -> str:
        texts = source.read().train.texts
        cache.say(
            f"training a {cfg.tokenizer_kind} tokenizer (vocabulary {cfg.vocab_size:,}) on {len(texts):,} documents"
        )
        return train_tokenizer(texts, cfg.tokenizer_kind, cfg.vocab_size).to_str()

    return cache.text_entry(path, train)


def _check_same_tokenizer(tokenizer_json: str, run_dir: Path | None, where: str) -> None:
    """A resumed run encodes with the tokenizer it started with: its model's embeddings are rows of that
    vocabulary, so another tokenizer would train on silently wrong ids."""
    kept = run_dir / TOKENIZER_FILE if run_dir is not None else None
    if kept is None or not kept.is_file():
        return
    if digest(load_tokenizer_json(str(kept))) != digest(tokenizer_json):
        raise DataError(
            f"{where} is not the tokenizer this run started with ({kept}); resume with that tokenizer "
            "(data.tokenizer unset reuses it) or start a new run directory"
        )


def build_text_task(cfg: DataConfig, run_dir: Path | None, share) -> TextTask:
    """The text task of `cfg`: `run_dir` is a resumed run's directory (its tokenizer is reused); `share(fn)` runs
    `fn` on rank 0 and gives its result to every rank."""
    source = open_source(cfg)
    what = f"data.path {cfg.path}" if cfg.path is not None else f"data.hf_dataset {cfg.hf_dataset!r}"
    fingerprint = source.fingerprint()
    if cfg.tokenizer is not None:
        tokenizer_json, where = load_tokenizer_json(cfg.tokenizer), f"data.tokenizer {cfg.tokenizer}"
        _check_same_tokenizer(tokenizer_json, run_dir, where)
    else:
        tokenizer_json = share(lambda: _trained_tokenizer(cfg, source, fingerprint, run_dir))
        where = "the trained tokenizer"
    specials = check_for(from_json(tokenizer_json), cfg, where)
    parts = {"source": fingerprint, "tokenizer": digest(tokenizer_json), "seq_len": cfg.seq_len, "seed": cfg.seed}
    parts.update(val_fraction=cfg.val_fraction, fields=[cfg.text_field, cfg.label_field], objective=cfg.objective)
    directory = cache.cache_root(cfg) / "text" / cache.key_of(parts)
    cache.entry(directory, lambda out: _write_arrays(out, source.read(), tokenizer_json, specials, cfg, what))
    return TextTask(cfg, directory, tokenizer_json, specials)
