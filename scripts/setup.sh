#!/usr/bin/env bash
# Creates .venv (if needed) and installs the toolkit with every extra, pinned by
# requirements/constraints.txt (the version set measured to work together on this machine kind),
# plus Debian's chromium + chromedriver for the web demo's browser test.
# Idempotent: a stamp of pyproject + constraints skips the pip install when nothing changed.
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
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium + chromium-driver (web demo browser test)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
  else
    echo "setup: chromium/chromedriver missing and cannot apt-get install them; the web-demo browser test will fail" >&2
  fi
fi
