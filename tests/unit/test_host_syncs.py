"""Host syncs: the counter (dtrain.syncs), and FPSA's solver and adjoint, whose exit checks no longer read the
device every iteration: the count per forward + backward does not grow with fpsa.max_iter, and the results do
not depend on when the exit is checked (an iteration after every token stopped changes nothing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dtrain.config import Config
from dtrain.data import TaskSpec
from dtrain.model import FixedPointAttention, build_model
from dtrain.model.solver import FIRST_CHECK, ExitSchedule, solve
from dtrain.syncs import count_syncs

SPEC = TaskSpec(name="t", vocab_size=7, seq_len=10, num_classes=5, per_token=False, targets_per_example=1, pad_id=0)
LAYERS = 2


def config(**fpsa) -> Config:
    return Config.model_validate(
        {"model": {"attention": "fpsa", "d_model": 16, "n_layers": LAYERS, "n_heads": 2}, "fpsa": fpsa}
    )


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 7, (4, 10), generator=g)
    mask = torch.arange(10)[None, :] < torch.tensor([10, 6, 3, 8])[:, None]
    return tokens.masked_fill(~mask, 0), mask


def step(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    tokens, mask = inputs(seed)
    out = model(tokens, mask)
    out.pow(2).mean().backward()
    return out, model.fpsa_stats()


# ---------------------------------------------------------------------------------------------- the counter


def test_the_counter_counts_what_makes_the_host_wait_and_nothing_else():
    t, mask = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([True, False, True])
    with count_syncs() as syncs:
        t.sum().item()
        bool(mask.any())
        float(t.max())
        int(t.argmax())
        t.tolist()
        t.numpy()
        t[mask]
        mask.nonzero()
        torch.where(mask)
        t.masked_select(mask)
        torch.equal(t, t)
        [0, 1, 2][torch.tensor(1)]
    assert syncs.total == 12, syncs
    with count_syncs() as syncs:  # all on the device: no sync
        torch.where(mask, t, 0.0).amax()
        t.masked_fill(~mask, 0).sum()
        t[torch.tensor([0, 2])]
        t[1:]
        (t > 0).any()
        torch.stack([t, t]).cpu()  # CPU to CPU: nothing to wait for
    assert syncs.total == 0, syncs
    assert isinstance(t.tolist(), list) and isinstance(t.numpy(), np.ndarray)  # the wrappers are gone again


def test_the_counter_sees_syncs_inside_backward_hooks():
    x = torch.ones(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: g * (1.0 if g.sum().item() > 0 else 0.0))
    y.register_hook(lambda g: (g.tolist(), g)[1])
    with count_syncs() as syncs:
        y.sum().backward()
    assert syncs.total == 2, syncs
    assert syncs.by_site and all(site.startswith("test_host_syncs.py:") for site in syncs.by_site), syncs


# ------------------------------------------------------------------------------------- FPSA: the count


@pytest.mark.parametrize("spectral_norm", [False, True])
@pytest.mark.parametrize("backward", ["implicit", "phantom", "bptt"])
def test_fpsa_forward_backward_syncs_do_not_grow_with_max_iter(backward, spectral_norm):
    """tol 1e-12 and the plain iteration: no token ever stops, every solve (and adjoint solve) runs all max_iter
    iterations (Anderson can land exactly on the fixed point in float32 and stop)."""
    first, steady = {}, {}
    for max_iter in (8, 32):
        torch.manual_seed(0)
        model = build_model(
            config(
                max_iter=max_iter,
                tol=1e-12,
                backward=backward,
                adj_max_iter=max_iter,
                adj_tol=1e-12,
                anderson_memory=0,
                spectral_norm=spectral_norm,
            ),
            SPEC,
        )
        counts = []
        for seed in range(3):
            with count_syncs() as syncs:
                _, stats = step(model, seed)
            counts.append(syncs.total)
            # the statistics still report every iteration the examples needed
            assert all(stats[f"fpsa/loop_l{i}"] == max_iter for i in range(LAYERS)), stats
            if backward == "implicit":
                assert all(stats[f"fpsa/adj_iters_l{i}"] == max_iter for i in range(LAYERS)), stats
        first[max_iter], steady[max_iter] = counts[0], counts[1:]
    solves = LAYERS * (2 if backward == "implicit" else 1)  # forward solves, and adjoint solves
    # from the second step on: one exit check per solve (at max_iter - 1) and one read of all fpsa/* figures;
    # before this change the same step made 46 (max_iter 8) and 142 (max_iter 32) syncs with implicit
    assert steady[8] == steady[32] == [solves + 1, solves + 1], (first, steady)
    # the first step learns the count: checks after 4, 5, 7, 11, ... iterations, logarithmic in max_iter
    for max_iter, count in first.items():
        assert count <= solves * (1 + math.ceil(math.log2(max_iter))) + 1, (first, steady)


def test_a_converged_solve_is_read_once_and_reports_its_iterations_without_another_sync():
    rates = torch.tensor([1e-9, 0.1, 0.5], dtype=torch.float64)[None, :, None]
    real = torch.tensor([[True, True, False]])
    schedule = ExitSchedule()
    targets = torch.tensor([3.0, 5.0, 7.0], dtype=torch.float64)[None, :, None]
    for _ in range(3):  # z -> (z + target) / 2 halves the distance each step: 1e-3 after about 12 steps
        with count_syncs() as syncs:
            z, stats = solve(
                lambda z: (z + targets) / 2, torch.ones(1, 3, 4, dtype=torch.float64), real, 1e-3, 50, schedule
            )
            needed = stats.iters
        assert stats.token_iters[0, 2] == 0 and bool(stats.converged[0, :2].all())
        assert needed == int(stats.token_iters.max())
    assert syncs.total == 1 and schedule.hint == needed, syncs  # learnt: one check, exactly at the end
    with count_syncs() as syncs:  # and the old freezing test still holds
        z, stats = solve(lambda z: z * (1 + rates), torch.ones(1, 3, 4, dtype=torch.float64), real, 1e-6, 7)
    assert stats.token_iters.tolist() == [[1, 7, 0]] and stats.iters == 7
    # checks after 4, 5 and 6 (= max_iter - 1, the last) found token 1 active: it needed all 7, known unread
    assert syncs.total == 3, syncs


def test_the_exit_schedule_checks_after_the_learnt_count_then_with_doubling_gaps():
    def checks(schedule: ExitSchedule, max_iter: int, needed: int) -> list[int]:
        seen = []
        schedule.start(max_iter)
        for iteration in range(1, max_iter + 1):
            if schedule.due(iteration):
                seen.append(iteration)
                if iteration >= needed:
                    schedule.done(needed)
                    break
                schedule.not_done(iteration)
        return seen

    schedule = ExitSchedule()
    assert FIRST_CHECK == 4
    assert checks(schedule, 32, 32) == [4, 5, 7, 11, 19, 31]
    assert checks(schedule, 32, 32) == [31]  # learnt: it runs to max_iter
    schedule = ExitSchedule()
    assert checks(schedule, 30, 9) == [4, 5, 7, 11]
    assert checks(schedule, 30, 9) == [9]
    wobbly = ExitSchedule(hint=6)
    for needed in (6, 7, 6, 7):  # planned from the fewest: no check after the loop is done by more than 1
        assert checks(wobbly, 30, needed)[-1] == needed
    assert checks(ExitSchedule(), 1, 1) == []  # max_iter 1: nothing to decide


# ------------------------------------------------------------------------------------- FPSA: the results


class EveryIteration(ExitSchedule):
    """The loop as it was: the exit condition read after every iteration."""

    def due(self, iteration: int) -> bool:
        return iteration > 0


class Late(ExitSchedule):
    """Always the latest check (after max_iter - 1 iterations): the most iterations after every token stopped."""

    hint = property(lambda self: 10**6)


def _set_schedules(model: torch.nn.Module, make) -> None:
    for layer in model.fpsa_layers():
        layer.solve_schedules = {True: make(), False: make()}
        layer.last_adjoint.schedule = make()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize(
    "fpsa",
    [
        {"backward": "implicit"},
        {"backward": "implicit", "spectral_norm": True},
        {"backward": "implicit", "damping": 1.0},
        {"backward": "phantom", "phantom_steps": 2},
        {"backward": "bptt"},
        {"backward": "bptt", "spectral_norm": True},
    ],
)
def test_results_are_bitwise_the_same_whenever_the_exit_is_checked(fpsa, monkeypatch):
    """Every iteration (the old loop), the learnt schedule, and checks as late as possible (many iterations
    after every token stopped): outputs, gradients, statistics and per-example counts agree bit for bit."""
    cfg = config(max_iter=16, tol=2e-3, adj_max_iter=40, adj_tol=1e-5, **fpsa)
    variants = {
        "every": lambda: EveryIteration(),
        "learnt": lambda: ExitSchedule(),
        "late": lambda: Late(),
    }
    calls = {name: 0 for name in variants}
    results = {}
    original_step = FixedPointAttention.step
    for name, make in variants.items():

        def counting_step(self, *args, _name=name, **kwargs):
            calls[_name] += 1
            return original_step(self, *args, **kwargs)

        monkeypatch.setattr(FixedPointAttention, "step", counting_step)
        torch.manual_seed(0)
        model = build_model(cfg, SPEC)
        _set_schedules(model, make)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        rows = []
        for seed in range(4):
            out, stats = step(model, seed)
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
            model.eval()
            with torch.no_grad():
                evaluated = model(*inputs(seed + 10))
            eval_stats, eval_iters = model.fpsa_stats(), model.fpsa_example_iters()
            model.train()
            rows.append((out, grads, stats, evaluated, eval_stats, eval_iters))
        results[name] = rows
    reference = results["every"]
    converged = [row[2]["fpsa/converged_frac"] for row in reference]
    assert all(0.0 < c for c in converged), converged  # tokens do stop (at different iterations)
    for name in ("learnt", "late"):
        for (out, grads, stats, ev, ev_stats, ev_iters), ref in zip(results[name], reference):
            assert torch.equal(_bits(out), _bits(ref[0])) and torch.equal(_bits(ev), _bits(ref[3])), name
            assert all(torch.equal(_bits(g), _bits(r)) for g, r in zip(grads, ref[1])), name
            assert stats == ref[2] and ev_stats == ref[4], (name, stats, ref[2])
            assert torch.equal(ev_iters, ref[5]), name
    assert calls["late"] > calls["every"], calls  # the late checks did run iterations after the end
