"""The flight recorder (issue 12): record sampled and alerting requests' activations to disk, read them back."""

from monitor.record.reader import RecordedRequest, Recording, RecordingError

__all__ = ["Recording", "RecordedRequest", "RecordingError"]
