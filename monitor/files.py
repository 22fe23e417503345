"""Reading files named by operators (rules, configs, directions, SAE configs) without ever blocking."""

from __future__ import annotations

import os
import stat


def read_regular_file(path, limit: int) -> bytes:
    """Read a whole regular file of at most `limit` bytes without ever blocking on it.

    A FIFO, socket or device named where a file is expected would block `open()` or read
    forever; it is refused from `stat` before opening, and again from `fstat` of what was
    opened (O_NONBLOCK), so a swap between the two checks gains nothing.
    """
    def regular(st) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise ValueError(f"{path}: {st.st_size} bytes, limit {limit}")

    regular(os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        regular(os.fstat(fd))
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ValueError(f"{path}: more than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)
