#!/usr/bin/env bash
# The test command of the README: the whole suite against the installed package.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# `pytest` (not `python -m pytest`, which puts the source folder first on sys.path) and
# --import-mode=importlib: tests import the
# installed cpsl (with its compiled _C), not the source folder.
exec pytest -q -p no:cacheprovider --import-mode=importlib tests "$@"
