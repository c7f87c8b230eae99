#!/usr/bin/env bash
# The second environment the stock-runtime tests generate in: requirements.txt beside this file on top of
# this interpreter's torch (--system-site-packages), so a cold build downloads no torch. Kept in the user's
# cache under the hash of requirements.txt: built once per machine, reused by every later run.
# Prints the environment's python.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python3}"
key="$(cat "$here/requirements.txt" <("$python" -c 'import sys, torch; print(sys.version, torch.__version__)') | sha256sum | cut -c1-16)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/pocketdiff/compat-$key"
if ! "$venv/bin/python" -c 'import optimum.onnxruntime, transformers, diffusers' >/dev/null 2>&1; then
  rm -rf "$venv"
  "$python" -m venv --system-site-packages "$venv" >&2
  # the project's own pins (transformers 5, diffusers 0.42) are shadowed in here on purpose: pip's conflict note is expected
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt" 2>&1 \
    | grep -v -e "dependency resolver does not currently" -e "requires .* but you have" -e "^WARNING: Location" >&2 || true
  "$venv/bin/python" -c 'import optimum.onnxruntime, transformers, diffusers' >&2
fi
echo "$venv/bin/python"
