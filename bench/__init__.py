"""Benchmarks: thin drivers over the dtrain library, each run from the repository root as a module,

    .venv/bin/python -m bench.NAME --help

and each writing its own section of docs/ (see docs/benchmarks.md and docs/model.md for the commands).
"""
