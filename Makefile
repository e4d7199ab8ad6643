# The README's two commands: `make quickstart` (main job) and `make test` (set-up + test suite).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup quickstart cluster lint test test-all clean

setup:
	@scripts/setup.sh

quickstart: setup
	@scripts/quickstart.sh

# A local docker-compose cluster (launch/compose_cluster; root, or a docker daemon): images built offline on the
# first run, then 2 node containers train configs/quickstart.yaml with rank-dAD; the run directory ends in --out.
CLUSTER_ARGS ?= --nodes 2 --out runs/compose-rankdad -- --config configs/quickstart.yaml --set comm.strategy=rankdad
cluster: setup
	@launch/compose_cluster $(CLUSTER_ARGS)

# The lint and format gate (ruff, configured in pyproject.toml); `make test` runs it first.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Default suite: the lint gate, then every test but those marked slow. Tests marked root run where root and `ip netns`
# exist, docker tests where root and apt-get or a docker daemon are (they install what they need), and skip with
# the reason elsewhere; gpu tests skip without CUDA.
test: lint
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
