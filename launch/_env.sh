# Sourced by the launch scripts: find the launchers (the venv at $VENV, default <repo>/.venv, else PATH).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${VENV:-$ROOT/.venv}/bin

find_tool() {
  if [ -x "$BIN/$1" ]; then echo "$BIN/$1"; return; fi
  command -v "$1" || { echo "launch: '$1' not found in $BIN or on PATH (set VENV=...)" >&2; exit 2; }
}

usage() {  # print the script's header comment (its usage) and exit 2
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0" >&2
  exit 2
}
