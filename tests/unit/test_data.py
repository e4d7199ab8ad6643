"""Synthetic tasks: purity, held-out splits, determinism, and labels checked against independent references."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch

from dtrain.config import SYNTHETIC_TASKS as TASKS
from dtrain.config import DataConfig
from dtrain.data import IGNORE, build_task


def make(task: str, **kw):
    kw.setdefault("seq_len", 24)
    kw.setdefault("max_depth", 4)
    kw.setdefault("n_val", 64)
    return build_task(DataConfig(task=task, **kw))


def rows(tokens: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in tokens.tolist()}


@pytest.mark.parametrize("task", TASKS)
def test_batch_is_concatenation_of_single_examples_and_repeatable(task):
    t = make(task)
    for split in ("train", "val"):
        whole = t.batch(split, 5, 12)
        singles = [t.batch(split, 5 + i, 1) for i in range(12)]
        again = make(task).batch(split, 5, 12)  # a fresh instance (another rank) builds the same examples
        for field in ("tokens", "targets", "mask", "difficulty"):
            joined = torch.cat([getattr(s, field) for s in singles])
            assert torch.equal(getattr(whole, field), joined), (split, field)
            assert torch.equal(getattr(whole, field), getattr(again, field)), (split, field)


@pytest.mark.parametrize("task", TASKS)
def test_shapes_and_spec(task):
    t = make(task)
    b = t.batch("train", 0, 8)
    spec = t.spec
    assert b.tokens.shape == b.mask.shape == (8, spec.seq_len)
    assert b.tokens.dtype == b.targets.dtype == b.difficulty.dtype == torch.int64
    assert b.mask.dtype == torch.bool
    assert b.targets.shape == ((8, spec.seq_len) if spec.per_token else (8,))
    assert spec.targets_per_example == (spec.seq_len if spec.per_token else 1)
    assert int(b.tokens.max()) < spec.vocab_size and int(b.tokens.min()) >= 0
    labelled = b.targets[b.targets != IGNORE]
    assert labelled.numel() == 8 * spec.targets_per_example
    assert int(labelled.max()) < spec.num_classes and int(labelled.min()) >= 0


@pytest.mark.parametrize("task", TASKS)
def test_val_never_occurs_in_train(task):
    # short sequences so that collisions would actually happen if the splits were not disjoint by construction
    t = make(task, seq_len=10, max_depth=3, n_val=200)
    val = rows(t.batch("val", 0, 200).tokens)
    train = rows(t.batch("train", 0, 3000).tokens)
    assert val and train and not (val & train)
    assert len(train) > 500  # the stream is not degenerate


@pytest.mark.parametrize("task", TASKS)
def test_seed_determines_the_data(task):
    a, b, c = make(task, seed=1), make(task, seed=1), make(task, seed=2)
    for split in ("train", "val"):
        assert torch.equal(a.batch(split, 0, 16).tokens, b.batch(split, 0, 16).tokens)
        assert not torch.equal(a.batch(split, 0, 16).tokens, c.batch(split, 0, 16).tokens)


def test_val_index_range_is_checked():
    t = make("parity", n_val=4)
    t.batch("val", 0, 4)
    with pytest.raises(IndexError):
        t.batch("val", 2, 3)
    with pytest.raises(ValueError):
        t.batch("test", 0, 1)


def test_listops_rejects_a_sequence_too_short_for_its_depth():
    with pytest.raises(ValueError, match="seq_len"):
        make("listops", seq_len=9, max_depth=3)


# ------------------------------------------------------------------------------------ independent references


def ref_parity(bits: list[int]) -> tuple[list[int], int]:
    out, acc = [], 0
    for b in bits:
        acc ^= b
        out.append(acc)
    return out, sum(bits)


def ref_group(task: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Elements (enumerated from all permutations, not generated) and the token -> permutation table."""

    def even(p):
        return sum(p[i] > p[j] for i in range(5) for j in range(i + 1, 5)) % 2 == 0

    elements = sorted(p for p in itertools.permutations(range(5)) if task == "s5" or even(p))
    second = (1, 0, 2, 3, 4) if task == "s5" else (1, 2, 0, 3, 4)
    return elements, [(0, 1, 2, 3, 4), second, (1, 2, 3, 4, 0)]


def ref_state_tracking(task: str, tokens: list[int]) -> tuple[list[int], int]:
    elements, perms = ref_group(task)
    state, out = tuple(range(5)), []
    for tok in tokens:
        g = perms[tok]
        state = tuple(g[state[i]] for i in range(5))  # apply the earlier tokens first, then g
        out.append(elements.index(state))
    return out, sum(tok != 0 for tok in tokens)


def ref_listops(tokens: list[int]) -> tuple[int, int]:
    """Stack evaluation of the token sequence (0 pad, 1..10 digits, 11..14 MAX MIN MED SM, 15 close)."""
    ops = {11: max, 12: min, 13: statistics.median_low, 14: lambda xs: sum(xs) % 10}
    stack: list[list] = []
    depth = deepest = 0
    result = None
    for tok in tokens:
        if tok == 0:
            break
        if tok in ops:
            stack.append([ops[tok]])
            depth += 1
            deepest = max(deepest, depth)
        elif tok == 15:
            fn, *args = stack.pop()
            depth -= 1
            value = fn(args)
            if stack:
                stack[-1].append(value)
            else:
                result = value
        else:
            stack[-1].append(tok - 1)
    assert not stack and result is not None, "malformed expression"
    return result, deepest


@pytest.mark.parametrize("task", TASKS)
def test_labels_and_difficulty_match_reference(task):
    t = make(task, seq_len=20, max_depth=5, n_val=150)
    for split in ("train", "val"):
        b = t.batch(split, 0, 150)
        for tokens, targets, mask, difficulty in zip(
            b.tokens.tolist(), b.targets.tolist(), b.mask.tolist(), b.difficulty.tolist()
        ):
            if task == "parity":
                assert (targets, difficulty) == ref_parity(tokens)
            elif task in ("s5", "a5"):
                assert (targets, difficulty) == ref_state_tracking(task, tokens)
            else:
                assert (targets, difficulty) == ref_listops(tokens)
                assert mask == [tok != 0 for tok in tokens]
                assert all(mask[: sum(mask)])  # padding only at the end


@pytest.mark.parametrize("task", TASKS)
def test_difficulty_is_spread(task):
    t = make(task, seq_len=24, max_depth=5)
    difficulty = t.batch("train", 0, 300).difficulty
    low, high = (1, 5) if task == "listops" else (0, 24)
    assert int(difficulty.min()) >= low and int(difficulty.max()) <= high
    assert len(set(difficulty.tolist())) >= (5 if task == "listops" else 15)


def test_token_difficulty_on_hand_made_sequences():
    """S5/A5: non-identity tokens so far; parity: ones so far; listops: nesting depth, brackets included."""
    for name in ("s5", "a5"):
        tokens = torch.tensor([[0, 1, 0, 2, 2, 0], [0, 0, 0, 0, 0, 0]])
        assert make(name, seq_len=6).token_difficulty(tokens).tolist() == [[0, 1, 1, 2, 3, 3], [0] * 6]
    bits = torch.tensor([[1, 0, 0, 1, 1, 0]])
    assert make("parity", seq_len=6).token_difficulty(bits).tolist() == [[1, 1, 1, 2, 3, 3]]
    # [MAX 2 9 [MIN 4 7 ] 0 ] <pad> <pad>
    mx, mn, close = 11, 12, 15
    expr = torch.tensor([[mx, 3, 10, mn, 5, 8, close, 1, close, 0, 0]])
    depth = make("listops", seq_len=11, max_depth=2).token_difficulty(expr)
    assert depth.tolist() == [[1, 1, 1, 2, 2, 2, 2, 1, 1, 0, 0]]


@pytest.mark.parametrize("task", TASKS)
def test_an_examples_difficulty_is_the_largest_of_its_tokens(task):
    t = make(task, seq_len=20, max_depth=5)
    b = t.batch("val", 0, 40)
    per_token = t.token_difficulty(b.tokens)
    assert per_token.shape == b.tokens.shape and per_token.dtype == torch.int64
    assert per_token.masked_fill(~b.mask, -1).amax(dim=1).tolist() == b.difficulty.tolist()
