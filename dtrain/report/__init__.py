"""`dtrain report RUN_DIR...`: bandwidth-vs-accuracy tables, plots and a wandb log from finished runs.

RUN_DIR is a run directory or any directory above run directories (a sweep's out). The report goes to
--out: report.md with one table per task, PNG plots it embeds, and an offline wandb run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .timemodel import parse_link_rates

DEFAULT_LINK_RATES = "10mbit,100mbit,1gbit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or directories above them (e.g. a sweep's out)"
    )
    parser.add_argument("--out", default="reports", help="where report.md and the plots go (default: ./reports)")
    parser.add_argument(
        "--target-acc",
        type=float,
        default=None,
        help="validation accuracy in (0, 1] for steps/time to target; default: 90%% of the best "
        "mean final accuracy in each task",
    )
    parser.add_argument(
        "--link-rates",
        default=DEFAULT_LINK_RATES,
        help=f"comma-separated link rates for the time model (default: {DEFAULT_LINK_RATES})",
    )
    parser.add_argument(
        "--wandb",
        choices=("offline", "disabled"),
        default="offline",
        help="log the table and a bytes-vs-accuracy scatter to an offline wandb run under --out",
    )


def run(args: argparse.Namespace) -> int:
    # matplotlib is imported here, not at the top, so that every other dtrain command starts without it
    from .build import make_report

    rates = parse_link_rates(args.link_rates.split(","))
    report = make_report(args.run_dirs, Path(args.out), args.target_acc, rates, args.wandb == "offline")
    for skip in report.skipped:
        print(f"skipped {skip.path}: {skip.reason}")
    print(f"report: {report.path}")
    if report.wandb_dir is not None:
        print(f"wandb (offline): {report.wandb_dir}")
    return 0
