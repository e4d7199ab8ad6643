"""`dtrain` command line: train, sweep, report, info.

Errors a user can fix (bad config, missing file, unwritable run directory) print one line and exit 2; any
other failure prints one line and exits 1. `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError

_LOCAL_RANK = re.compile(r"^--local[-_]rank(?:=(\d+))?$")


def _pop_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """Accept `--local_rank=N` (deepspeed launcher, placed before the subcommand) and `--local-rank N`
    (torch.distributed.launch) anywhere on the line."""
    out, rank, i = [], None, 0
    while i < len(argv):
        m = _LOCAL_RANK.match(argv[i])
        if m:
            if m.group(1) is not None:
                rank = int(m.group(1))
            elif i + 1 < len(argv) and argv[i + 1].isdigit():
                rank = int(argv[i + 1])
                i += 1
        else:
            out.append(argv[i])
        i += 1
    return out, rank


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtrain",
        description="Distributed training with dAD / rank-dAD gradient communication for the SELF-Transformer.",
    )
    p.add_argument("--version", action="version", version=f"dtrain {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,sweep,report,info}")

    from .compression.registry import help_text

    t = sub.add_parser(
        "train",
        help="train one run (plain process, torchrun or deepspeed launcher)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="comm.strategy (--set comm.strategy=NAME):\n" + help_text(),
    )
    t.add_argument("--config", required=True, help="YAML config file")
    t.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set train.steps=50 comm.strategy=dad",
    )
    t.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint in the run dir")
    t.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    s = sub.add_parser("sweep", help="run a grid of runs (strategies x ranks x seeds)")
    r = sub.add_parser("report", help="bandwidth-vs-accuracy report from run directories")
    from . import report, sweep

    sweep.add_arguments(s)
    report.add_arguments(r)
    for q in (s, r):
        q.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    i = sub.add_parser("info", help="versions, torch.distributed backends and devices")
    i.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def cmd_train(args: argparse.Namespace, local_rank: int | None) -> int:
    from .config import check_world_size, load_config
    from .distributed import init_distributed, launched_world_size, shutdown

    cfg = load_config(args.config, args.overrides)  # validated before any process group exists
    world = launched_world_size()
    check_world_size(cfg, world)
    if cfg.train.engine == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    env = init_distributed(cfg.comm.timeout_s, local_rank)
    try:
        from .trainer import train

        train(cfg, env, config_path=args.config, resume=args.resume)
    finally:
        shutdown()
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_info() -> int:
    import platform

    import torch
    import torch.distributed as dist

    def version(mod: str) -> str:
        try:
            if mod == "deepspeed":
                os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
            return __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 - info must never fail
            return f"not available ({type(err).__name__})"

    backends = [
        name
        for name, ok in (
            ("gloo", dist.is_gloo_available()),
            ("nccl", dist.is_nccl_available()),
            ("mpi", dist.is_mpi_available()),
            ("ucc", getattr(dist, "is_ucc_available", lambda: False)()),
        )
        if ok
    ]
    print(f"dtrain     {__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"torch      {torch.__version__}")
    print(f"deepspeed  {version('deepspeed')}")
    print(f"wandb      {version('wandb')}")
    print(f"backends   {', '.join(backends) or 'none'}")
    print(f"cpu        {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(d)
            memory_gib = prop.total_memory / 2**30
            print(f"cuda:{d}     {prop.name}, {memory_gib:.1f} GiB, capability {prop.major}.{prop.minor}")
    else:
        print("cuda       no GPU visible (training runs on the CPU with gloo)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv, local_rank = _pop_local_rank(list(sys.argv[1:] if argv is None else argv))
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, local_rank)
        if args.command == "info":
            return cmd_info()
        if args.command == "sweep":
            from . import sweep

            return sweep.run(args)
        from . import report

        return report.run(args)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"dtrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dtrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as err:  # noqa: BLE001 - one line for the user; --debug for the traceback
        if args.debug:
            raise
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(
            f"dtrain: error{where}: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
