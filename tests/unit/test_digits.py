"""digits: the spec per patch size, tokens against a loop-by-loop reference, a split held out by image and fixed by
data.seed, batches that do not depend on how they are cut, a new order on every pass, offline loading."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from dtrain.config import DataConfig
from dtrain.data import build_task
from dtrain.data.digits import CUTS, DIFFICULTY_BUCKETS, VAL_FRACTION, Digits, load_images, shifted, tokenize

N_IMAGES = 1797


def make(**kw) -> Digits:
    task = build_task(DataConfig(task="digits", **kw))
    assert isinstance(task, Digits)
    return task


def rows(tokens: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in tokens.tolist()}


def reference_tokens(image: np.ndarray, patch: int) -> list[int]:
    """Squares read row by row; inside a square, pixels row by row as base-`levels` digits, least significant
    first; a pixel's level is the number of cut points at or below its value."""
    cuts = CUTS[patch]
    levels = len(cuts) + 1
    out = []
    for top in range(0, 8, patch):
        for left in range(0, 8, patch):
            code, weight = 0, 1
            for y in range(top, top + patch):
                for x in range(left, left + patch):
                    code += sum(int(image[y, x]) >= c for c in cuts) * weight
                    weight *= levels
            out.append(code)
    return out


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_spec_and_batch_shapes_for_every_patch(patch):
    t = make(patch=patch, seq_len=99)  # data.seq_len is not read: the patch fixes the length
    spec = t.spec
    assert spec.seq_len == 64 // patch**2
    assert spec.vocab_size == (len(CUTS[patch]) + 1) ** (patch * patch)
    assert (spec.num_classes, spec.per_token, spec.targets_per_example, spec.pad_id) == (10, False, 1, None)
    for split, count in (("train", 200), ("val", t.n_val)):
        b = t.batch(split, 0, count)
        assert b.tokens.shape == b.mask.shape == (count, spec.seq_len)
        assert b.targets.shape == b.difficulty.shape == (count,)
        assert b.tokens.dtype == b.targets.dtype == b.difficulty.dtype == torch.int64
        assert bool(b.mask.all())
        assert 0 <= int(b.tokens.min()) and int(b.tokens.max()) < spec.vocab_size
        assert set(b.targets.tolist()) == set(range(10))
        assert 0 <= int(b.difficulty.min()) and int(b.difficulty.max()) < DIFFICULTY_BUCKETS


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_tokens_match_a_loop_by_loop_reference(patch):
    images, labels = load_images()
    t = make(patch=patch)
    by_tokens = {tuple(reference_tokens(img, patch)): int(lab) for img, lab in zip(images, labels)}
    for split, count in (("train", 150), ("val", 150)):
        b = t.batch(split, 0, count)
        for tokens, target in zip(b.tokens.tolist(), b.targets.tolist()):
            assert by_tokens.get(tuple(tokens)) == target


def test_split_is_held_out_by_image_and_stratified():
    images, labels = load_images()
    assert len({img.tobytes() for img in images}) == N_IMAGES  # no two images are equal: rows identify images
    t = make(n_val=10_000)
    train, val = set(t.train_rows.tolist()), set(t.val_rows.tolist())
    assert not train & val and train | val == set(range(N_IMAGES))
    assert len(t.train) == len(train) and len(t.val) == t.n_val == len(val)
    # what is served is those images
    assert torch.equal(t.batch("val", 0, t.n_val).tokens, torch.from_numpy(tokenize(images[t.val_rows], 2)))
    assert torch.equal(t.batch("val", 0, t.n_val).targets, torch.from_numpy(labels[t.val_rows]))
    served = rows(t.batch("train", 0, len(t.train)).tokens)
    assert served == rows(torch.from_numpy(tokenize(images[t.train_rows], 2)))
    per_class, held = np.bincount(labels, minlength=10), np.bincount(labels[t.val_rows], minlength=10)
    assert np.all(np.abs(held - VAL_FRACTION * per_class) <= 0.5)


def test_n_val_is_capped_by_the_validation_split():
    assert make(n_val=40).n_val == 40
    t = make(n_val=10_000)
    assert t.n_val == len(t.val) < 400
    with pytest.raises(IndexError):
        t.batch("val", 0, t.n_val + 1)


def test_first_validation_images_are_a_mixed_sample():
    assert len(set(make(n_val=50).batch("val", 0, 50).targets.tolist())) == 10


def test_seed_fixes_the_split_and_the_order():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    for split in ("train", "val"):
        assert torch.equal(a.batch(split, 0, 64).tokens, b.batch(split, 0, 64).tokens)
        assert not torch.equal(a.batch(split, 0, 64).tokens, c.batch(split, 0, 64).tokens)
    assert set(a.val_rows.tolist()) == set(b.val_rows.tolist()) != set(c.val_rows.tolist())


def test_batches_do_not_depend_on_how_they_are_cut():
    t, fresh = make(), make()  # a fresh instance: another rank
    n = len(t.train)
    for split, start, count in (("train", 0, 8), ("train", n - 5, 12), ("val", 3, 8)):
        whole = t.batch(split, start, count)
        half = count // 2
        later = fresh.batch(split, start + half, count - half)  # asked for first, on the other instance
        earlier = t.batch(split, start, half)
        for field in ("tokens", "targets", "mask", "difficulty"):
            joined = torch.cat([getattr(earlier, field), getattr(later, field)])
            assert torch.equal(getattr(whole, field), joined), (split, start, field)


def test_every_pass_visits_every_training_image_in_a_new_order():
    t = make()
    n = len(t.train)
    first, second = t.rows("train", 0, n), t.rows("train", n, n)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert not np.array_equal(first, second)
    assert not torch.equal(t.batch("train", 0, n).tokens, t.batch("train", n, n).tokens)


def test_shifted_copies_move_each_image_by_every_offset_with_zero_fill():
    images = load_images()[0][:5]
    copies = shifted(images, 1).reshape(9, 5, 8, 8)
    assert np.array_equal(copies[0], images), "the unmoved images come first"
    seen = set()
    for moved in copies[1:]:
        # which (dy, dx) this copy is: the one whose zero-filled move of the images it equals
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if np.array_equal(moved, _move(images, dy, dx))]
        assert len(offsets) >= 1
        seen.add(offsets[0])
    assert seen == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)} - {(0, 0)}


def _move(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Pixel (y, x) goes to (y + dy, x + dx); what comes in from the border is 0."""
    out = np.zeros_like(images)
    for y in range(8):
        for x in range(8):
            if 0 <= y + dy < 8 and 0 <= x + dx < 8:
                out[:, y + dy, x + dx] = images[:, y, x]
    return out


def test_shift_adds_moved_training_copies_and_leaves_validation_alone():
    plain, augmented = make(), make(shift=1)
    assert len(augmented.train) == 9 * len(plain.train)
    assert np.array_equal(augmented.train_rows, plain.train_rows)
    assert torch.equal(augmented.batch("val", 0, plain.n_val).tokens, plain.batch("val", 0, plain.n_val).tokens)
    # the first copy is the unmoved training split, with its labels
    assert np.array_equal(augmented.train.tokens[: len(plain.train)], plain.train.tokens)
    assert np.array_equal(augmented.train.targets, np.tile(plain.train.targets, 9))


def test_difficulty_buckets_are_training_quintiles_of_atypicality():
    images, labels = load_images()
    t = make()
    n = len(t.train)
    counts = np.bincount(t.train.difficulty, minlength=DIFFICULTY_BUCKETS)
    assert np.all(np.abs(counts - n / DIFFICULTY_BUCKETS) <= 2)
    # independently: the distance of each training image to its class's mean training image, ranked
    flat = images[t.train_rows].reshape(n, -1).astype(float)
    own = labels[t.train_rows]
    means = np.stack([flat[own == c].mean(0) for c in range(10)])
    dist = np.linalg.norm(flat - means[own], axis=1)
    order = np.argsort(dist, kind="stable")
    assert np.all(np.diff(t.train.difficulty[order]) >= 0)  # buckets grow with the distance
    assert t.train.difficulty[order[0]] == 0 and t.train.difficulty[order[-1]] == DIFFICULTY_BUCKETS - 1


def test_loads_without_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("digits tried to open a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert len(make().train) + len(make().val) == N_IMAGES
