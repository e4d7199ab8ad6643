"""digits: scikit-learn's bundled 8x8 handwritten digits as a sequence of patch tokens, one label per image.

The data. `sklearn.datasets.load_digits()` reads 1,797 real 8x8 greyscale images (pixel values 0..16, classes 0..9,
about 180 each) from a file inside the scikit-learn wheel: nothing is downloaded, so the task runs anywhere offline.

The tokens. The image is cut into non-overlapping patch x patch squares (`data.patch`), read row by row, and each
square becomes one token: its pixels, each quantised to a few levels, read as the digits of a base-`levels`
number (the square's first pixel the least significant). So `data.patch` fixes the sequence length, 64 / patch²;
`data.seq_len` is not read (the model takes the length from the task's spec). The levels per patch size:

    patch  tokens  pixel levels (value ranges)                 vocabulary
      1      64    4: 0-3, 4-7, 8-11, 12-16                         4
      2      16    3: 0-3 background, 4-9 edge, 10-16 ink          81
      4       4    2: 0-8, 9-16                                 65,536

They were chosen by measurement (docs/data.md has the runs). The model embeds each token id independently, so a
token id that training shows rarely keeps a nearly random embedding: more levels keep more of the image (an RBF
SVM reaches 98% on 3- or 4-level images, 96% on 2-level ones) but spread the examples over more ids. At patch 2,
2 levels (16 ids) learn fastest but stop near the binary image's limit (3,000 steps: 93% and 96% on two seeds),
4 levels (256 ids) learn slowest (90% where 2 levels reach 95%), and 3 levels (81 ids, all of them frequent)
reach 95% and 96% given the same 3,000 steps. At patch 1 the 17 raw values were worse than 4 levels (92% vs
95%, same run). At patch 4 no small alphabet keeps the shape (2x2 averages at 4 levels: 78% for a linear probe), so
2 levels per pixel it is, with a large, sparse vocabulary (about 860 of its 65,536 ids occur, 86% in a short run):
patch 4 is there for the shortest sequences, not for accuracy.

The moved copies. With `data.shift: s` the training split also holds every training image moved by each offset
(dy, dx) in -s..s (zero-filled: 0 is the background), (2s + 1)² copies in all; validation images are never moved.
Handwriting sits a pixel higher or lower, so a model that has seen an image only where it was drawn learns its
position as well as its shape. At s = 1 the config's 3,000 steps of 128 reached 97.2-97.5% where the unmoved
images reached 95.0-96.1% (docs/data.md).

The split. Held out by image, fixed by `data.seed`: in every class a seeded 20% of the images is validation
(stratified, so both splits keep the class balance; 359 images), the rest training (1,438). The validation images
are put in a seeded order, so the first `data.n_val` of them (n_val = min(data.n_val, 359)) are a mixed sample.
The training stream visits the training images in a new seeded order on every pass (`ArrayTask`).

The difficulty. How atypical an image is: its distance (raw pixels) to the mean training image of its class,
bucketed 0 (most typical fifth) .. 4 (least typical fifth) by the quintiles of the training images' distances.
Evaluation reports accuracy and FPSA iterations per bucket, so "harder" here means unusual handwriting (accuracy
falls from 100% in bucket 0 to about 85% in bucket 4).
"""

from __future__ import annotations

import numpy as np

from dtrain.config import DataConfig

from .tasks import ArrayTask, ExampleArrays, TaskSpec

#: per patch side, the pixel values where the next quantisation level starts (levels = len + 1)
CUTS = {1: (4, 8, 12), 2: (4, 10), 4: (9,)}
#: share of each class held out for validation
VAL_FRACTION = 0.2
#: difficulty buckets (quantiles of the distance to the class mean)
DIFFICULTY_BUCKETS = 5
SIDE = 8
CLASSES = 10


def levels(patch: int) -> int:
    return len(CUTS[patch]) + 1


def vocab_size(patch: int) -> int:
    return levels(patch) ** (patch * patch)


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """(images int64 [1797, 8, 8] in 0..16, labels int64 [1797]), read from the scikit-learn wheel."""
    from sklearn.datasets import load_digits  # imported here: only this task needs scikit-learn

    digits = load_digits()
    return digits.images.astype(np.int64), digits.target.astype(np.int64)


def tokenize(images: np.ndarray, patch: int) -> np.ndarray:
    """int64 [N, (8 / patch)²]: each patch x patch square of each image, quantised by CUTS[patch], as one id."""
    q = np.searchsorted(np.asarray(CUTS[patch]), images, side="right")
    n, grid = len(images), SIDE // patch
    squares = q.reshape(n, grid, patch, grid, patch).transpose(0, 1, 3, 2, 4).reshape(n, grid * grid, patch * patch)
    return squares @ (levels(patch) ** np.arange(patch * patch, dtype=np.int64))


def shifted(images: np.ndarray, shift: int) -> np.ndarray:
    """[(2 shift + 1)² x N, 8, 8]: every image moved by each (dy, dx) in -shift..shift, zero-filled (the
    background's value), the unmoved images first."""
    moves = [(0, 0)] + [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1) if dy or dx]
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift)))
    return np.concatenate(
        [padded[:, shift - dy : shift - dy + SIDE, shift - dx : shift - dx + SIDE] for dy, dx in moves]
    )


def split_rows(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of the dataset: a seeded VAL_FRACTION of every class to val, val in a seeded order."""
    rng = np.random.default_rng([seed % 2**63, 11])
    val = [rng.permutation(np.flatnonzero(labels == c)) for c in range(CLASSES)]
    val_rows = rng.permutation(np.concatenate([rows[: round(VAL_FRACTION * len(rows))] for rows in val]))
    train_rows = np.setdiff1d(np.arange(len(labels)), val_rows)  # sorted: ArrayTask orders every pass itself
    return train_rows, val_rows


def atypicality(images: np.ndarray, labels: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """int64 [N] in 0 .. DIFFICULTY_BUCKETS-1: distance to the class's mean training image, in training quintiles.
    Only training images set the means and the edges, so a validation image's bucket says nothing about its label
    that the training split does not."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    means = np.stack([flat[train_rows][labels[train_rows] == c].mean(0) for c in range(CLASSES)])
    dist = np.linalg.norm(flat - means[labels], axis=1)
    edges = np.quantile(dist[train_rows], np.linspace(0, 1, DIFFICULTY_BUCKETS + 1)[1:-1])
    return np.searchsorted(edges, dist, side="right").astype(np.int64)


class Digits(ArrayTask):
    """The digits task. `train_rows` / `val_rows`: the images (indices into load_digits()) of each split, val in
    the order it is served."""

    def __init__(self, cfg: DataConfig) -> None:
        images, labels = load_images()
        tokens = tokenize(images, cfg.patch)
        self.train_rows, self.val_rows = split_rows(labels, cfg.seed)
        difficulty = atypicality(images, labels, self.train_rows)
        spec = TaskSpec(
            name="digits",
            vocab_size=vocab_size(cfg.patch),
            seq_len=tokens.shape[1],
            num_classes=CLASSES,
            per_token=False,
            targets_per_example=1,
            pad_id=None,
        )

        copies = (2 * cfg.shift + 1) ** 2
        train = ExampleArrays(
            tokens=tokenize(shifted(images[self.train_rows], cfg.shift), cfg.patch),
            targets=np.tile(labels[self.train_rows], copies),
            difficulty=np.tile(difficulty[self.train_rows], copies),
        )
        val = ExampleArrays(
            tokens=tokens[self.val_rows], targets=labels[self.val_rows], difficulty=difficulty[self.val_rows]
        )
        super().__init__(spec, cfg.seed, train, val, cfg.n_val)
