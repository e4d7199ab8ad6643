"""report.md: the tables, how their figures were computed, the plots, and the runs that were skipped."""

from __future__ import annotations

from pathlib import Path

from ..metrics import format_bytes
from .plots import Plot
from .rundir import Skipped
from .table import TaskTable, headline, to_markdown
from .timemodel import MODEL_DESCRIPTION, LinkRate

COLUMNS_EXPLAINED = (
    "Columns: *payload / step* is what one rank handed to collectives per step, *wire / step* the bytes the "
    "collectives' algorithms put on its link (estimated), *payload ratio* the fp32 all-reduce payload of the "
    "same model divided by the payload (summary.json's compression_ratio), *wire ratio* the wire bytes of an "
    "fp32 ring all-reduce of the same model at the same world size, 2(S−1)/S × 4 × trainable parameters, "
    "divided by the wire bytes (— at world size 1, where neither puts anything on a link; at S = 2 both ratios "
    "coincide for all-reduce and all-gather traffic, beyond it all-gather traffic grows as (S−1) × payload), "
    "*final val acc* the mean ± sample standard deviation over seeds, *steps to* the first evaluated step at "
    "the target accuracy, *comm / step* and *step time* measured means, *time to target, as run* steps to "
    "target × measured step time (on the link the runs had), *time to target @ rate* the model above. Figures "
    "over several seeds are means; steps and time to target average the seeds that reached the target and say "
    "how many did when not all."
)


def write_report(
    out: Path,
    tables: list[TaskTable],
    plots: dict[str, list[Plot]],
    rates: list[LinkRate],
    n_runs: int,
    skipped: list[Skipped],
) -> Path:
    lines = [
        "# Bandwidth vs accuracy",
        "",
        f"{n_runs} complete run(s), {len(skipped)} skipped{' (listed at the end)' if skipped else ''}.",
        "",
        "## Time model",
        "",
        MODEL_DESCRIPTION,
        "",
        "Link rates: " + ", ".join(f"{r.label} = {format_bytes(r.bytes_per_s)}/s" for r in rates) + ".",
        "",
        COLUMNS_EXPLAINED,
    ]
    for table in tables:
        lines += [
            "",
            f"## Task: {table.task}",
            "",
            f"Target accuracy: {table.target_acc:.4f} ({table.target_rule}).",
            "",
        ]
        line = headline(table)
        if line is not None:
            lines += [line, ""]
        lines += [to_markdown(table, rates)]
        for plot in plots.get(table.task, []):
            lines += ["", f"![{plot.title}]({plot.path.name})"]
    if skipped:
        lines += ["", "## Skipped runs", ""]
        for skip in skipped:
            log = skip.path / "train.log"
            lines.append(f"- `{skip.path}`: {skip.reason}" + (f" (log: `{log}`)" if log.is_file() else ""))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
