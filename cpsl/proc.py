"""Running a ``cpsl`` command as a child process: the one runner of the MOSI recipe, the k-fold and
bench/ (each child gets its own threads and its own log, and a failure is one ``error:`` line)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .errors import CPSLError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]      # the folder holding this cpsl (a checkout or site-packages)


def child_env(threads: int = 0) -> dict:
    """The environment of a cpsl child: this cpsl first on PYTHONPATH; ``threads`` > 0 caps OpenMP/MKL."""
    path = os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = dict(os.environ, PYTHONPATH=path)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def exec_cpsl(args) -> None:
    """Replace this process by ``python -m cpsl ARGS`` (a script that forwards to a cpsl command: the
    command's output, errors and exit code are the script's own)."""
    os.execve(sys.executable, [sys.executable, "-m", "cpsl", *map(str, args)], child_env())


def run_cpsl(args, log: str | Path | None = None, quiet: bool = True, threads: int = 0) -> float:
    """Run ``python -m cpsl ARGS`` with this very cpsl; wall seconds. With ``log`` and ``quiet`` its
    output goes to ``log`` (the command line first; the folder is created), else to the console.
    ``threads`` > 0 also caps OpenMP/MKL threads of the child. A failing child raises CPSLError."""
    args = [str(a) for a in args]
    env = child_env(threads)
    cmd = [sys.executable, "-m", "cpsl", *args]
    t0 = time.time()
    if quiet and log is not None:
        Path(log).parent.mkdir(parents=True, exist_ok=True)   # a fresh machine has no cache folder yet
        with open(log, "w") as f:
            f.write("cpsl " + shlex.join(args) + "\n")
            f.flush()
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    else:
        r = subprocess.run(cmd, env=env)
    if r.returncode:
        where = f"; see {log}" if quiet and log is not None else ""
        raise CPSLError(f"failed ({r.returncode}): cpsl {shlex.join(args)}{where}")
    return time.time() - t0
