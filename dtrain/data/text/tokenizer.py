"""The tokenizer: trained on the training split with Hugging Face `tokenizers`, or loaded from `data.tokenizer`.

A trained tokenizer (WordPiece, BERT's lower-casing normaliser and pre-tokeniser; or byte-level BPE, which never
needs an unknown token) carries the special tokens [PAD] [UNK] [CLS] [SEP] [MASK]. It is kept as its JSON text,
which is what travels from rank 0 to the other ranks, what the cache keys hash and what the run directory keeps
(tokenizer.json), so every rank and a resumed run encode with the identical tokenizer.

A loaded tokenizer may name its special tokens differently ([MASK] or <mask>, [PAD] or <pad>, ...): `Specials`
finds them. Encoding never adds special tokens (the task places its own) and never truncates or pads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dtrain.config import DataConfig

from .sources import DataError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: spellings of each special token that tokenizers in the wild use, in order of preference
_SPELLINGS = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "sep": ("[SEP]", "</s>", "<|endoftext|>", "<eos>"),
}


@dataclass(frozen=True)
class Specials:
    """Ids of the special tokens the tasks use (None where the tokenizer has none)."""

    pad: int | None
    mask: int | None
    sep: int | None
    #: ids of every special token (never drawn as the random replacement of masked-LM)
    all_ids: tuple[int, ...]

    @classmethod
    def of(cls, tok: Tokenizer) -> Specials:
        found = {
            role: next((i for s in spellings if (i := tok.token_to_id(s)) is not None), None)
            for role, spellings in _SPELLINGS.items()
        }
        added = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        ids = tuple(sorted(added | {i for i in found.values() if i is not None}))
        return cls(pad=found["pad"], mask=found["mask"], sep=found["sep"], all_ids=ids)


def train_tokenizer(texts: list[str], kind: str, vocab_size: int) -> Tokenizer:
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def tokenizer_file(path: str) -> Path:
    """The tokenizer.json that `data.tokenizer` names (the file, or inside a transformers tokenizer directory)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise DataError(
                f"data.tokenizer: the directory {path} has no tokenizer.json (save a fast tokenizer with "
                "save_pretrained, or point at its tokenizer.json)"
            )
    elif not p.is_file():
        raise DataError(f"data.tokenizer: {path} does not exist")
    return p


def load_tokenizer_json(path: str) -> str:
    """The JSON text of the tokenizer at `data.tokenizer`, checked to load."""
    p = tokenizer_file(path)
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        return from_json(text).to_str()  # canonical JSON: the same tokenizer hashes the same however it was saved
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise DataError(f"data.tokenizer: {p} is not a tokenizers JSON file ({first})") from None


def from_json(text: str) -> Tokenizer:
    tok = Tokenizer.from_str(text)
    tok.no_truncation()
    tok.no_padding()
    return tok


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_for(tok: Tokenizer, cfg: DataConfig, where: str) -> Specials:
    """The special tokens the objective needs, or a one-line error naming the tokenizer."""
    specials = Specials.of(tok)
    if cfg.objective == "mlm" and specials.mask is None:
        raise DataError(f"{where}: the tokenizer has no mask token ([MASK] or <mask>), which masked-LM needs")
    if cfg.objective == "classification" and specials.pad is None:
        raise DataError(f"{where}: the tokenizer has no padding token ([PAD] or <pad>), which classification needs")
    if tok.get_vocab_size() - len(specials.all_ids) < 1:
        raise DataError(f"{where}: the tokenizer has no ordinary tokens")
    return specials
