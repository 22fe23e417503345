"""In-memory stores: the embedded default for one sidecar (nothing shared, nothing persisted)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Callable

from monitor.stores.base import StoredRules


class MemoryRuleStore:
    """A versioned rule set held in this process."""

    def __init__(self, yaml: str = "", author: str = "") -> None:
        self._lock = threading.Lock()
        self._current = StoredRules(yaml=yaml, version=1 if yaml else 0, author=author, updated_unix_s=time.time())
        self._subscribers: list[Callable[[StoredRules], None]] = []

    def get(self) -> StoredRules:
        return self._current

    def put(self, yaml: str, author: str) -> int:
        with self._lock:
            self._current = StoredRules(yaml, self._current.version + 1, author, time.time())
            current, subscribers = self._current, list(self._subscribers)
        for callback in subscribers:
            callback(current)
        return current.version

    def subscribe(self, callback: Callable[[StoredRules], None]) -> None:
        self._subscribers.append(callback)

    def close(self) -> None:
        self._subscribers.clear()


class MemoryEventStore:
    """A bounded ring of events; `follow` blocks until newer events arrive or the wait ends."""

    def __init__(self, maxlen: int = 10_000) -> None:
        self._events: deque[dict] = deque(maxlen=maxlen)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self.appended = 0

    def append(self, event: dict) -> str:
        with self._cond:
            event_id = f"{int(time.time() * 1000)}-{next(self._ids)}"
            self._events.append({**event, "id": event_id})
            self.appended += 1
            self._cond.notify_all()
        return event_id

    def tail(self, last: int) -> list[dict]:
        with self._cond:
            return list(self._events)[-last:] if last > 0 else []

    def follow(self, after_id: str | None, block_ms: int) -> list[dict]:
        deadline = time.monotonic() + block_ms / 1000
        with self._cond:
            while True:
                newer = self._newer_than(after_id)
                remaining = deadline - time.monotonic()
                if newer or remaining <= 0:
                    return newer
                self._cond.wait(remaining)

    def _newer_than(self, after_id: str | None) -> list[dict]:
        if after_id is None:
            return list(self._events)
        seq = int(after_id.split("-")[1])
        return [e for e in self._events if int(e["id"].split("-")[1]) > seq]

    def close(self) -> None:
        pass
