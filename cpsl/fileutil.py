"""Small file helpers shared by every layer (no cpsl imports)."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_file(path: str | Path) -> None:
    """Raise ``OSError`` (one line at the CLI) when ``path`` exists and is not a regular file: writing a FIFO
    would block until someone reads it, a device (``/dev/full``) or a folder cannot hold the output."""
    import errno
    import stat
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "a pipe or device, not a regular file"
        raise OSError(errno.EINVAL, f"output is {what}", str(path))


def content_tag(*parts) -> str:
    """A short hex digest of JSON-serialisable ``parts`` (cache folder names that change with their inputs)."""
    import hashlib
    import json
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()
