"""The recent token ids of each tracked request, for an alert's context.

One ``[rows, WIDTH]`` table for all requests (a row per request, slot ``position % WIDTH``), so a
batch's ids are written with one vectorised assignment whatever the number of requests in it.
Memory: ``WIDTH × 12`` bytes (768 B) per tracked request that sent ids, rows allocated as requests
arrive (doubling) and never beyond the request table's bound.
"""

from __future__ import annotations

import numpy as np

WIDTH = 64  # positions kept per request
BEFORE, AFTER = 32, 16  # an alert's context: up to this many known tokens either side


class TokenWindows:
    def __init__(self, max_rows: int, width: int = WIDTH) -> None:
        self.width, self.max_rows = width, max_rows
        self._ids = np.zeros((0, width), dtype=np.uint32)  # the wire's type
        self._pos = np.full((0, width), -1, dtype=np.int64)  # the position each slot holds, -1: none
        self._free: list[int] = []

    @property
    def nbytes(self) -> int:
        return self._ids.nbytes + self._pos.nbytes

    def acquire(self) -> int:
        """A cleared row for a new request, or -1 when all ``max_rows`` are taken."""
        if not self._free:
            have = len(self._ids)
            grow = min(max(64, have), self.max_rows - have)
            if grow <= 0:
                return -1
            self._ids = np.concatenate([self._ids, np.zeros((grow, self.width), np.uint32)])
            self._pos = np.concatenate([self._pos, np.full((grow, self.width), -1, np.int64)])
            self._free.extend(range(have + grow - 1, have - 1, -1))
        row = self._free.pop()
        self._pos[row] = -1
        return row

    def release(self, row: int) -> None:
        if row >= 0:
            self._free.append(row)

    def note(self, req_rows: np.ndarray, token_request: np.ndarray, positions: np.ndarray,
             ids: np.ndarray) -> None:
        """Record a batch's ``ids`` at ``positions``; ``token_request`` indexes ``req_rows`` (the
        row of each request of the batch, -1: none). A slot keeps the newest position written to
        it, so a token re-sent late (or the front of a prefill longer than the window) never
        overwrites a newer one."""
        if not len(positions):
            return
        # within this batch, only each request's newest `width` positions: their slots are distinct
        high = np.full(len(req_rows), -1, dtype=np.int64)
        np.maximum.at(high, token_request, positions)
        mine = (positions > high[token_request] - self.width) & (req_rows[token_request] >= 0)
        rows, positions, ids = req_rows[token_request[mine]], positions[mine], ids[mine]
        slots = positions % self.width
        newer = positions >= self._pos[rows, slots]
        rows, slots = rows[newer], slots[newer]
        self._pos[rows, slots] = positions[newer]
        self._ids[rows, slots] = ids[newer]

    def known(self, row: int) -> dict[int, int]:
        """position -> id of what the row holds."""
        if row < 0:
            return {}
        pos = self._pos[row]
        held = pos >= 0
        return dict(zip(pos[held].tolist(), self._ids[row][held].tolist()))


def context_around(position: int, known: dict[int, int], before: int = BEFORE,
                   after: int = AFTER) -> tuple[int, list[int]] | None:
    """``(first position, ids)``: the unbroken run of known tokens around ``position`` (at most
    ``before`` ahead of it and ``after`` behind), or None when its own id is unknown."""
    if position not in known:
        return None
    lo = position
    while lo - 1 in known and position - lo < before:
        lo -= 1
    hi = position
    while hi + 1 in known and hi - position < after:
        hi += 1
    return lo, [known[p] for p in range(lo, hi + 1)]
