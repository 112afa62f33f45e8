#!/usr/bin/env bash
# Creates .venv (if needed) and installs the toolkit with every extra, pinned by
# requirements/constraints.txt (the version set measured to work together on this machine kind).
# Idempotent: a stamp of pyproject + constraints skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" != "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -c requirements/constraints.txt -e ".[all,dev]"
  echo "$stamp" > .venv/.setup-stamp
fi
