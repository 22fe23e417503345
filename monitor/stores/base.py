"""Store interfaces: a versioned rule set shared by replicas, and an append-only event stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


class StoreUnavailable(ConnectionError):
    """The store could not be reached for an operation whose caller must know (put, tail)."""


@dataclass(frozen=True)
class StoredRules:
    """One version of the rules YAML as a store holds it."""

    yaml: str
    version: int
    author: str = ""
    updated_unix_s: float = 0.0


class RuleStore(Protocol):
    """Rules shared by every sidecar replica; `subscribe` callbacks fire on every new version."""

    def get(self) -> StoredRules: ...

    def put(self, yaml: str, author: str) -> int: ...

    def subscribe(self, callback: Callable[[StoredRules], None]) -> None: ...

    def close(self) -> None: ...


class EventStore(Protocol):
    """Alert and audit events (alerts, steering applied, rule changes); never raises on append."""

    def append(self, event: dict) -> str: ...

    def tail(self, last: int) -> list[dict]: ...

    def follow(self, after_id: str | None, block_ms: int) -> list[dict]: ...

    def close(self) -> None: ...
