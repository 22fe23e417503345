"""The steering table's rows and clamp slots: allocation, reference counts, host mirrors.

A *program* is a set of actions; identical programs share one row of :class:`SteerTables`,
identical clamps one clamp slot of their layer, so an always-on policy costs one row however many
requests it matches. Only the forward thread calls this, between steps.
"""

from __future__ import annotations

import numpy as np
import torch

from monitor.plugin.actions import Action, ClampAction, program_key
from monitor.plugin.ops import SteerTables


class TableFull(Exception):
    pass


class SteeringTable:
    """Allocates rows and clamp slots of :class:`SteerTables` and writes them."""

    def __init__(self, tables: SteerTables, hooked_layers: list[int]) -> None:
        self.t = tables
        self.slot_of_layer = {layer: i for i, layer in enumerate(hooked_layers)}
        # host mirrors, flushed to the device between steps (on CPU they are the tables)
        names = ("row_on", "active", "add", "encg", "bias", "thr", "gbias", "val", "dec")
        self.host = {
            n: (getattr(tables, n).cpu().clone() if tables.on_device else getattr(tables, n))
            for n in names
        }
        self.dirty: set[tuple[str, int, int]] = set()
        self.rows: dict[str, list] = {}  # program key -> [row, refcount, actions]
        self.row_keys: dict[int, frozenset[str]] = {}  # row -> its program's action keys
        self.free_rows = list(range(tables.rows - 1, 0, -1))
        self.clamps: list[dict[str, list]] = [{} for _ in hooked_layers]  # key -> [slot, refs]
        self.free_clamps = [list(range(tables.clamps - 1, -1, -1)) for _ in hooked_layers]

    @property
    def rows_in_use(self) -> int:
        return len(self.rows)

    def _write(self, name: str, layer_slot: int, index: int, value) -> None:
        self.host[name][layer_slot, index] = value
        if self.t.on_device:
            self.dirty.add((name, layer_slot, index))

    def flush(self) -> None:
        """Copy changed entries to the device (stream-ordered before the next forward)."""
        if not self.dirty:
            return
        for name, ls, idx in self.dirty:
            getattr(self.t, name)[ls, idx].copy_(self.host[name][ls, idx], non_blocking=False)
        self.dirty.clear()

    def _acquire_clamp(self, ls: int, c: ClampAction) -> int:
        entry = self.clamps[ls].get(c.key)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        if not self.free_clamps[ls]:
            raise TableFull(f"no free clamp slot on layer {c.layer} "
                            f"(FEATUREWATCH_STEER_CLAMPS={self.t.clamps})")
        slot = self.free_clamps[ls].pop()
        C = self.t.clamps
        self._write("encg", ls, slot, torch.from_numpy(c.encoder))
        gate = c.gate_encoder if c.gate_encoder is not None else np.zeros_like(c.encoder)
        self._write("encg", ls, C + slot, torch.from_numpy(gate))
        self._write("bias", ls, slot, c.bias)
        self._write("thr", ls, slot, c.threshold)
        self._write("gbias", ls, slot, c.gate_bias if c.gate_encoder is not None else 1.0)
        self._write("val", ls, slot, c.value)
        self._write("dec", ls, slot, torch.from_numpy(c.decoder))
        self.clamps[ls][c.key] = [slot, 1]
        return slot

    def _release_clamp(self, ls: int, key: str) -> None:
        entry = self.clamps[ls][key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.clamps[ls][key]
            self.free_clamps[ls].append(entry[0])

    def acquire(self, actions: tuple[Action, ...]) -> int:
        """The row running ``actions`` (0 for none); raises :class:`TableFull`."""
        actions = tuple(a for a in actions if a.layer in self.slot_of_layer)
        if not actions:
            return 0
        key = program_key(actions)
        entry = self.rows.get(key)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        if not self.free_rows:
            raise TableFull(f"no free steering row (FEATUREWATCH_STEER_ROWS={self.t.rows})")
        taken: list[tuple[int, str]] = []
        try:
            for a in actions:
                if isinstance(a, ClampAction):
                    ls = self.slot_of_layer[a.layer]
                    self._acquire_clamp(ls, a)
                    taken.append((ls, a.key))
        except TableFull:
            for ls, k in taken:
                self._release_clamp(ls, k)
            raise
        row = self.free_rows.pop()
        d = self.t.d_model
        for ls in range(len(self.clamps)):
            mask = torch.zeros(self.t.clamps, dtype=torch.bool)
            vec = np.zeros(d, dtype=np.float32)
            on = False
            for a in actions:
                if self.slot_of_layer[a.layer] != ls:
                    continue
                on = True
                if isinstance(a, ClampAction):
                    mask[self.clamps[ls][a.key][0]] = True
                else:
                    vec += a.vector
            self._write("active", ls, row, mask)
            self._write("add", ls, row, torch.from_numpy(vec))
            self._write("row_on", ls, row, on)
        self.rows[key] = [row, 1, actions]
        self.row_keys[row] = frozenset(a.key for a in actions)
        return row

    def release(self, actions: tuple[Action, ...]) -> None:
        actions = tuple(a for a in actions if a.layer in self.slot_of_layer)
        if not actions:
            return
        key = program_key(actions)
        entry = self.rows[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        row = entry[0]
        del self.rows[key]
        self.row_keys.pop(row, None)
        for a in actions:
            if isinstance(a, ClampAction):
                self._release_clamp(self.slot_of_layer[a.layer], a.key)
        for ls in range(len(self.clamps)):
            self._write("row_on", ls, row, False)
            self._write("active", ls, row, torch.zeros(self.t.clamps, dtype=torch.bool))
            self._write("add", ls, row, torch.zeros(self.t.d_model))
        self.free_rows.append(row)
