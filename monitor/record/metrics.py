"""featurewatch_record_* metrics, on the sidecar's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RecordMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p, r = "featurewatch_record_", registry
        self.requests = Counter(p + "requests", "Requests written to the recording, by reason (sample, rule).", ["reason"], registry=r)
        self.tokens = Counter(p + "tokens", "Token rows written to the recording.", registry=r)
        self.bytes_written = Counter(p + "bytes_written", "Bytes of shard files written.", registry=r)
        self.shards = Counter(p + "shards", "Shards written.", registry=r)
        self.shards_rotated = Counter(p + "shards_rotated", "Shards deleted by rotation, by reason (max_bytes, max_age).", ["reason"], registry=r)
        self.batches_dropped = Counter(p + "batches_dropped", "Batches the recorder could not take (queue_full: its "
                                       "queue was full; their requests are not recorded).", ["reason"], registry=r)
        self.requests_dropped = Counter(p + "requests_dropped", "Requests that would have been recorded and were not, by "
                                        "reason (buffer_full, queue_full, write_error, incompatible, layer_missing, "
                                        "excluded: left out by record.exclude).", ["reason"], registry=r)
        self.disk_bytes = Gauge(p + "disk_bytes", "Bytes of complete shards in the recording directory.", registry=r)
        self.buffer_bytes = Gauge(p + "buffer_bytes", "Bytes of tokens buffered for requests in flight.", registry=r)
        self.queue_depth = Gauge(p + "queue_batches", "Batches handed to the recorder and not yet copied.", registry=r)
