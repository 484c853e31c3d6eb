#!/usr/bin/env bash
# Prints the path of marlgrc's virtualenv, creating it on first use.
# The venv lives outside the clone, keyed by the hash of requirements.lock, so CI and
# later checkouts reuse it; a changed lock file gets a fresh venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lock="$root/requirements.lock"
key="$( (cat "$lock"; python3 --version) | sha256sum | cut -c1-16)"
cache="${MARLGRC_CACHE:-$HOME/.cache/marlgrc}"
venv="$cache/venv-$key"
if [ ! -f "$venv/.complete" ] && command -v flock >/dev/null; then
  # one creator at a time: a second `./dev ...` started meanwhile waits, then finds the venv complete
  mkdir -p "$cache"
  exec 9>"$cache/.venv-$key.lock"
  flock 9
fi
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  command -v python3 >/dev/null || { echo "python3 (>= 3.11) is required: install it first" >&2; exit 1; }
  python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || { echo "marlgrc needs Python >= 3.11; found $(python3 --version)" >&2; exit 1; }
  echo "creating virtualenv $venv (first run only; PyTorch is a large download)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$lock" >&2
  touch "$venv/.complete"
fi
echo "$venv"
