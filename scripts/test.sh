#!/usr/bin/env bash
# The test command of the README: the layer contract (import-linter), then the whole suite
# against the installed package, with the interpreter of the active environment.
# On a fresh machine it first installs what the tests need: torch (pinned as in .ci/run, the CPU
# build on this machine's disk) and the package with its dev extra, never another torch.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd -P)"
cd "$root"
PY=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
tv=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
# install unless the environment already has the test tools and a cpsl installed from THIS checkout
# (pip's direct_url.json): an older cpsl elsewhere on the path (a --system-site-packages venv) is not it
if ! (cd / && CPSL_SRC="$root" "$PY" -c "
import json, os, cpsl._C, cpsl.cli, pytest, hypothesis, importlinter
from importlib.metadata import distribution
url = json.loads(distribution('cpsl').read_text('direct_url.json') or '{}').get('url', '')
raise SystemExit(url != 'file://' + os.environ['CPSL_SRC'])") 2>/dev/null; then
  "$PY" -m pip install -q -c <(echo "torch==$tv") ".[dev,export]"
fi
# 1. the layers of docs/architecture.md ([tool.importlinter] in pyproject.toml)
"$PY" -c "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())" --config "$root/pyproject.toml" --no-cache
# 2. the suite, from outside the source tree with --import-mode=importlib: the tests import the
#    installed cpsl (with its compiled _C), not the source folder.
cd "$root/tests"
exec "$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib --durations=25 --rootdir "$root" -c "$root/pyproject.toml" "$root/tests" "$@"
