"""Fuzzed configs: seeded mutations of configs/quickstart.yaml (wrong types, out-of-range and huge values, unknown
keys, missing keys, YAML syntax errors) either validate or fail with one line, never with another exception.

Each mutation goes through what `dtrain train` runs before any process group exists (`load_config`, then
`check_world_size`); the first few that validate also train one step in this process through the CLI entry
(`dtrain.cli.main`), which must end with exit code 0 (or 2 with one line)."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from dtrain.cli import main
from dtrain.config import Config, ConfigError, check_world_size, load_config
from tests.helpers.launch import ROOT

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
BASE = yaml.safe_load(QUICKSTART.read_text())
#: survivors trained for one step (each costs a few seconds)
TRAINED = 4


def _schema(model: type[BaseModel] = Config, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every key path of the config with its annotation."""
    paths: dict[tuple[str, ...], Any] = {}
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            paths[path] = field.annotation
            paths.update(_schema(field.annotation, path))
        else:
            paths[path] = field.annotation
    return paths


SCHEMA = _schema()
LEAVES = [p for p, a in SCHEMA.items() if not (isinstance(a, type) and issubclass(a, BaseModel))]
SECTIONS = [p for p in SCHEMA if p not in LEAVES]
#: every allowed value of every enum-like key, offered to every key (valid here, wrong there)
ENUM_VALUES = sorted(
    {v for a in SCHEMA.values() if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)}, key=str
)

HUGE = [2**31, 2**63, 10**12, 10**30, 1e308, math.inf, -math.inf, math.nan]
values = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 3, 7, 64, *HUGE]),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ENUM_VALUES),
    st.text(max_size=12),
    st.sampled_from(["", "1e3", "yes", "null", "100mbit", "0x10", "~/x", "-"]),
    st.booleans(),
    st.none(),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "steps", "rank"]), st.integers(0, 3), max_size=2),
)
paths = st.one_of(
    st.sampled_from(LEAVES),
    st.sampled_from(SECTIONS),
    st.tuples(st.sampled_from([s[0] for s in SECTIONS]), st.text(min_size=1, max_size=8)),  # unknown keys
    st.tuples(st.text(min_size=1, max_size=8)),
)


def _set(data: dict, path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def _delete(data: dict, path: tuple[str, ...]) -> None:
    node = data
    for part in path[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(path[-1], None)


@st.composite
def mutated_yaml(draw) -> str:
    data = yaml.safe_load(QUICKSTART.read_text())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(paths)
        if draw(st.booleans()):
            _set(data, path, draw(values))
        else:
            _delete(data, path)
    text = yaml.safe_dump(data, sort_keys=False)
    syntax = draw(st.sampled_from(["none", "none", "insert", "truncate", "tab", "top-level"]))
    if syntax == "insert":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(st.sampled_from([":", "[", "{", "- ", "'", '"', "\t", "&a", "*b", "!!python/name:os.system", "%"]))
            + text[at:]
        )
    elif syntax == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif syntax == "tab":
        text = text.replace("  ", "\t", 1)
    elif syntax == "top-level":
        text = draw(st.sampled_from(["- a\n- b\n", "42\n", "just text\n", "[1, 2\n"]))
    return text


def _validate(path: Path) -> Config | None:
    """What `dtrain train` does before a process group exists: the config, or None after a one-line ConfigError."""
    try:
        cfg = load_config(path)
        check_world_size(cfg, 1)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err), repr(str(err))
        return None
    return cfg


@pytest.mark.timeout(600)
def test_fuzzed_configs_validate_or_fail_in_one_line_and_survivors_train_a_step(tmp_path_factory, capsys):
    trained: list[str] = []
    seen = {"total": 0, "valid": 0}

    @settings(
        max_examples=250,
        derandomize=True,  # seeded: the same mutations on every run
        deadline=None,  # the first survivors train a step; the test's timeout is the hang guard
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(mutated_yaml())
    def check(text: str) -> None:
        work = tmp_path_factory.mktemp("fuzz")
        path = work / "config.yaml"
        path.write_text(text)
        cfg = _validate(path)
        seen["total"] += 1
        if cfg is None:
            return
        seen["valid"] += 1
        if len(trained) >= TRAINED or cfg.to_dict() == load_config(QUICKSTART).to_dict():
            return
        capsys.readouterr()
        one_step = ["train.steps=1", "eval.every=0", "checkpoint.every=0", "log.wandb=disabled", "log.progress=false"]
        code = main(["train", "--config", str(path), "--set", *one_step, f"run.dir={work / 'run'}"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtrain: error")]
        assert code == 0 or (code == 2 and len(err) == 1), (code, err, text)
        trained.append(text)

    check()
    assert seen["total"] >= 200 and len(trained) == TRAINED, seen
