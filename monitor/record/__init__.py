"""The flight recorder (issue 12): record sampled and alerting requests' activations to disk, read them back.

``from monitor.record import Recording, RecordedRequest, RecordingError`` (imported lazily, so the
sidecar config can import ``monitor.record.config`` without pyarrow)."""

__all__ = ["Recording", "RecordedRequest", "RecordingError"]


def __getattr__(name: str):
    if name in __all__:
        from monitor.record import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'monitor.record' has no attribute {name!r}")
