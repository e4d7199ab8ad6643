"""Small text corpora with structure a model can learn: a directory of plain-text files, a labelled JSONL file.

The sentences come from a seeded template grammar (subject, verb, object, place), so the words around a masked
token predict it far better than its frequency alone; labels follow the words a review uses."""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird", "the farmer", "our team"]
VERBS = ["sees", "likes", "follows", "paints", "finds", "carries", "watches", "builds"]
OBJECTS = ["a red ball", "the green house", "a long river", "the tall tree", "a quiet road", "the bright star"]
PLACES = ["in the morning", "near the lake", "after dinner", "under the bridge", "at the market", "on the hill"]
GOOD = ["wonderful", "great", "lovely", "excellent", "delightful"]
BAD = ["terrible", "awful", "boring", "dreadful", "poor"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."


def paragraph(rng: random.Random, sentences: tuple[int, int] = (3, 8)) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(*sentences))).capitalize()


def write_text_dir(root: Path, files: int = 4, paragraphs: int = 40, seed: int = 0) -> Path:
    """`files` .txt files of `paragraphs` blank-line-separated paragraphs (documents) each."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        (root / f"part{f}.txt").write_text("\n\n".join(paragraph(rng) for _ in range(paragraphs)) + "\n")
    return root


def review(rng: random.Random, label: int) -> str:
    words = GOOD if label else BAD
    return f"{sentence(rng)} it was {rng.choice(words)} and {rng.choice(words)}. {sentence(rng)}"


def write_reviews_jsonl(path: Path, n: int = 400, seed: int = 0, text_field: str = "text") -> Path:
    """`n` labelled reviews ({"text": ..., "label": "pos" | "neg"}), half of each."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({text_field: review(rng, i % 2), "label": "pos" if i % 2 else "neg"}) + "\n")
    return path
