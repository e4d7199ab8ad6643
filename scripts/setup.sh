#!/usr/bin/env bash
# Creates .venv and installs dtrain into it.
# torch first: on a CPU machine `torch==2.13.0` (a local CPU wheel is offered by the machine's pip
# configuration); a bare `torch` requirement resolved alone pulls a multi-GB CUDA build.
# If the interpreter already has a CUDA torch, the venv inherits it instead (system site packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${DTRAIN_TORCH:-torch==2.13.0}

if [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/ruff" ] && "$VENV/bin/python" -c "import dtrain, torch, deepspeed, wandb, pytest, tokenizers, sklearn, pyarrow, transformers, datasets" 2>/dev/null \
   && [ "${DTRAIN_REINSTALL:-0}" != 1 ]; then
  # Already set up: refresh the editable install only (fast, no network).
  "$VENV/bin/pip" install -q --no-deps -e . >/dev/null
  echo "setup: $VENV ready (torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
  exit 0
fi

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "setup: keeping the CUDA torch of $PY"
  "$PY" -m venv --system-site-packages "$VENV"
  TORCH_SPEC="torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
else
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
echo "setup: installing $TORCH_SPEC and dtrain[dev,hf] into $VENV (about a minute)"
# pip's configured mirrors print one "is ignored" line per package that they lack: noise, not errors.
"$VENV/bin/pip" install -q "$TORCH_SPEC" -e ".[dev,hf]" 2> >(grep -v -e "is ignored: it is neither" -e "^$" >&2)
"$VENV/bin/python" -c "import torch, deepspeed, wandb; print('setup: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| wandb', wandb.__version__)"
