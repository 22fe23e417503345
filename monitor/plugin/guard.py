"""Host side of the steering op's finiteness guard.

The op (ops.py) keeps a token's original residual row whenever steering would have made it
non-finite, and counts that per layer and steering row in ``SteerTables.nonfinite``. After a
steered step the host reads the counts back (asynchronously on a GPU: it never waits for the
device) and maps the flagged rows to the action keys of the programs they ran, so the runtime can
drop those actions: a request whose steering misbehaves is served unsteered, never with NaN.

Rows are remembered per step until a read-back covers them, so a row reassigned to another
program in between is attributed to both (dropping too much is the safe side).
"""

from __future__ import annotations

import numpy as np
import torch

from monitor.plugin.ops import SteerTables


class NonfiniteGuard:
    def __init__(self, tables: SteerTables) -> None:
        self.tables = tables
        self._since: dict[int, frozenset[str]] = {}  # rows of steps not yet read back -> keys
        self._pending: tuple | None = None  # (event | None, counts, rows)
        self._host: torch.Tensor | None = None

    def note_step(self, rows: np.ndarray, row_keys: dict[int, frozenset[str]]) -> None:
        """Before a steered forward: which programs its rows run."""
        for r in np.unique(rows).tolist():
            if r:
                self._since[r] = self._since.get(r, frozenset()) | row_keys.get(r, frozenset())

    def after_step(self) -> None:
        """After a steered forward: start reading the counts back (one read-back in flight)."""
        if self._pending is not None or not self._since:
            return
        nf = self.tables.nonfinite
        if not self.tables.on_device:
            counts = nf.sum(0).numpy().copy()
            nf.zero_()
            self._pending = (None, counts, self._since)
        else:
            if self._host is None:
                self._host = torch.zeros(nf.shape[1], dtype=nf.dtype, pin_memory=True)
            self._host.copy_(nf.sum(0), non_blocking=True)
            nf.zero_()  # stream-ordered after the copy
            event = torch.cuda.Event()
            event.record()
            self._pending = (event, self._host, self._since)
        self._since = {}

    def collect(self) -> tuple[int, set[str]]:
        """(refused token rows, action keys of their programs) once the read-back is done;
        (0, empty) while it is in flight or when nothing was refused."""
        if self._pending is None:
            return 0, set()
        event, counts, rows = self._pending
        if event is not None and not event.query():
            return 0, set()
        self._pending = None
        c = counts.numpy() if isinstance(counts, torch.Tensor) else counts
        total = int(c.sum())
        if not total:
            return 0, set()
        keys: set[str] = set()
        for r in np.nonzero(c)[0].tolist():
            keys |= rows.get(r, frozenset())
        return total, keys
