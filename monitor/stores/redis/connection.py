"""Talking to Redis: key names, clients with short timeouts, backoff, and stream-entry decoding."""

from __future__ import annotations

import hashlib
import json
import random
import socket

import redis as _redis
from redis.backoff import NoBackoff
from redis.retry import Retry

CONN_ERRORS: tuple[type[BaseException], ...] = (
    _redis.ConnectionError,
    _redis.TimeoutError,
    OSError,
)


def redis_keys(prefix: str = "featurewatch") -> dict[str, str]:
    """The key names for a prefix (wrapped in a hash tag so a Lua script's keys share a slot)."""
    tag = prefix if "{" in prefix else "{" + prefix + "}"
    return {
        "rules": f"{tag}:rules",
        "version": f"{tag}:rules:version",
        "channel": f"{tag}:rules:changed",
        "events": f"{tag}:events",
    }


def connect(url: str, socket_timeout: float, retries: int = 1) -> _redis.Redis:
    # redis-py's default retries 10 times with backoff: far too long for a sidecar. One retry
    # covers the stale pooled connection after a Redis restart; the loops here do their own backoff.
    return _redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, 1.0),
        retry=Retry(NoBackoff(), retries),
        decode_responses=True,
        health_check_interval=0,
    )


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class Backoff:
    """Jittered exponential backoff for the background loops."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self.current = initial

    def next(self) -> float:
        delay = self.current * random.uniform(0.5, 1.0)
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


def decode_entry(entry_id: str, fields: dict[str, str]) -> dict:
    try:
        event = json.loads(fields.get("data") or "{}")
        if not isinstance(event, dict):
            event = {"data": event}
    except ValueError:
        event = {"data": fields.get("data")}
    event.setdefault("kind", fields.get("kind", "event"))
    if "event_id" in fields:
        event.setdefault("event_id", fields["event_id"])
    event["id"] = entry_id
    return event


def hostname() -> str:
    return socket.gethostname()


def safe_url(url: str) -> str:
    """The URL without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
