"""Every torch.distributed collective in the package goes through one of two modules: compression/comm.py
(`Comm`: gradient traffic, with its byte accounting) or distributed.py (control traffic: flags, eval sums,
checkpoint barriers). This test parses every module of the package and fails, naming file:line, on any other
module that calls (or imports, or takes a reference to) a collective of torch.distributed."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import dtrain

PACKAGE = Path(dtrain.__file__).resolve().parent
ALLOWED = {"dtrain/compression/comm.py", "dtrain/distributed.py"}
COLLECTIVES = frozenset(
    {
        "all_reduce",
        "all_gather",
        "all_gather_object",
        "all_gather_into_tensor",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "all_to_all",
        "gather",
        "scatter",
        "send",
        "recv",
        "isend",
        "irecv",
    }
)
# the modules whose functions those are (torch.distributed re-exports distributed_c10d's)
DIST_MODULES = frozenset({"torch.distributed", "torch.distributed.distributed_c10d"})


def _dotted(node: ast.expr) -> str | None:
    """'torch.distributed' for the expression torch.distributed; None for anything but a name chain."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = _dotted(node.value)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


def _module_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to torch.distributed (or distributed_c10d), plus their full dotted names."""
    aliases = set(DIST_MODULES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {alias.asname for alias in node.names if alias.name in DIST_MODULES and alias.asname}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in DIST_MODULES:
                    aliases.add(alias.asname or alias.name)
    return aliases


def _uses(tree: ast.Module) -> Iterator[tuple[int, str]]:
    modules = _module_aliases(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in DIST_MODULES and node.level == 0:
            for alias in node.names:
                if alias.name in COLLECTIVES or alias.name == "*":
                    yield node.lineno, f"from {node.module} import {alias.name}"
        elif isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and _dotted(node.value) in modules:
            yield node.lineno, str(_dotted(node))


def violations_in(source: str, filename: str) -> list[str]:
    """'file:line: what' for each use of a torch.distributed collective in `source`, in line order."""
    return [f"{filename}:{line}: {what}" for line, what in sorted(_uses(ast.parse(source, filename)))]


def package_violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package.parent).as_posix()
        if name not in ALLOWED:
            found.extend(violations_in(path.read_text(), name))
    return found


def test_no_module_but_comm_and_distributed_calls_a_collective():
    found = package_violations()
    assert not found, (
        "torch.distributed collectives outside dtrain/compression/comm.py and dtrain/distributed.py "
        "(use Comm for gradients, dtrain.distributed's functions for control traffic):\n  " + "\n  ".join(found)
    )


def test_the_gate_sees_every_spelling():
    source = "\n".join(
        [
            "import torch",
            "import torch.distributed as dist",
            "from torch import distributed as d",
            "from torch.distributed import barrier as wait_all",
            "import torch.distributed.distributed_c10d as c10d",
            "dist.all_reduce(t)",  # 6
            "torch.distributed.broadcast(t, src=0)",  # 7
            "d.all_gather_object(out, obj)",  # 8
            "c10d.send(t, 1)",  # 9
            "reduce = dist.reduce_scatter_tensor",  # 10: a reference passed around is a call later
        ]
    )
    found = violations_in(source, "m.py")
    assert [f.split(":")[1] for f in found] == ["4", "6", "7", "8", "9", "10"], found
    assert "m.py:6: dist.all_reduce" in found


def test_the_gate_ignores_what_is_not_a_torch_distributed_collective():
    source = "\n".join(
        [
            "import torch",
            "import torch.distributed as dist",
            "from dtrain.distributed import all_reduce_sum, barrier",
            "torch.gather(x, 0, idx)",  # a tensor op that shares a collective's name
            "self.comm.all_reduce(t)",  # Comm, the strategies' way to a collective
            "barrier()",  # dtrain.distributed's
            "dist.get_world_size(); dist.ReduceOp.SUM",
        ]
    )
    assert violations_in(source, "m.py") == []
