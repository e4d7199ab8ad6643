# The README's two commands: `make quickstart` (main job) and `make test` (set-up + test suite).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup quickstart lint test test-all clean

setup:
	@scripts/setup.sh

quickstart: setup
	@scripts/quickstart.sh

# The lint and format gate (ruff, configured in pyproject.toml); `make test` runs it first.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Default suite: the lint gate, then every test but those marked slow. Tests marked root run where root and `ip netns`
# exist and skip with the reason elsewhere; gpu tests skip without CUDA.
test: lint
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
