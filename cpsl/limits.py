"""Resource limits on what a file or a config may ask for (no cpsl imports).

Each limit has a default that fits every real MMSA dataset and cpsl run we know of, and an
environment variable that raises it for a user who needs more. A file or config beyond a limit
is refused with one line naming the limit and its variable, before anything is allocated.

=============================  ===========  ===============================================
variable                       default      what it bounds
=============================  ===========  ===============================================
``CPSL_MAX_PICKLE_DEPTH``      64           nesting of containers in a data file/checkpoint
``CPSL_MAX_PICKLE_ITEMS``      50,000,000   items of the containers, shared references counted
                                            each time they are used (what ``np.asarray`` builds)
``CPSL_MAX_ARRAY_BYTES``       8 GiB        one array (a file's, or one a config makes: the
                                            synthetic data, a batch, the model's tables)
=============================  ===========  ===============================================
"""
from __future__ import annotations

import os

DEFAULTS = {"CPSL_MAX_PICKLE_DEPTH": 64, "CPSL_MAX_PICKLE_ITEMS": 50_000_000, "CPSL_MAX_ARRAY_BYTES": 8 << 30}


def limit(name: str) -> int:
    """The limit ``name`` (a key of :data:`DEFAULTS`): the environment's value when it is a positive integer."""
    raw = os.environ.get(name, "")
    try:
        v = int(raw)
    except ValueError:
        return DEFAULTS[name]
    return v if v > 0 else DEFAULTS[name]


def gib(n: int) -> str:
    return f"{n / (1 << 30):.3g} GiB"
