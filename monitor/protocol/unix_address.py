"""A Unix socket address for a path of any length.

An ``AF_UNIX`` address holds at most 107 bytes; a ring directory (a pytest tmp dir, a deep
Kubernetes mount) can be longer. Binding or connecting through ``/proc/self/fd/<dir fd>/<name>``
reaches the same file with a short address (Linux)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

MAX_ADDRESS = 107


@contextmanager
def unix_address(path: str) -> Iterator[str]:
    """``path`` itself when it fits, else a short alias valid inside the ``with``."""
    if len(os.fsencode(path)) <= MAX_ADDRESS:
        yield path
        return
    directory, name = os.path.split(path)
    fd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{name}"
    finally:
        os.close(fd)
