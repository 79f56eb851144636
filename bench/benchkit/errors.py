"""Bad input to a bench script is one ``error:`` line on stderr and exit code 2 (the house rule)."""
from __future__ import annotations

import functools
import sys

from cpsl.errors import CPSLError


class BenchError(Exception):
    """A user-facing error of a bench script: one ``error:`` line, exit code 2."""


def bench_main(fn):
    """Wrap a script's ``main``: a BenchError, a CPSLError (a cpsl call refusing its input) or a
    ``SystemExit`` carrying a message becomes one ``error:`` line on stderr and the return value 2;
    argparse's own exits (``--help``: 0, usage: 2) pass through."""
    @functools.wraps(fn)
    def run(*args, **kw):
        try:
            return fn(*args, **kw)
        except (BenchError, CPSLError) as e:
            msg = str(e)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                raise
            msg = str(e.code)
        print(msg if msg.startswith("error:") else f"error: {msg}", file=sys.stderr)
        return 2
    return run
