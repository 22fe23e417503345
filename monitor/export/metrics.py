"""Prometheus metrics (DESIGN.md §6): `featurewatch_` prefix, base units, bounded labels.

Updated once per batch, never per token: label children are cached and per-token distributions
(probe scores) are binned with numpy into a histogram collector.
"""

from __future__ import annotations

import gc
import math
import re
import threading
import time
from collections import OrderedDict

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import HistogramMetricFamily

from monitor.export.plugin_stats import PluginCounts

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SCORE_BUCKETS = tuple(round(x, 2) for x in np.linspace(0.05, 1.0, 20))

disable_created_metrics()  # `_created` series double the exposition and no dashboard reads them


class BatchHistogram:
    """A histogram fed whole arrays at a time (np.histogram), exposed as a normal Prometheus histogram."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.edges = np.array(buckets, dtype=np.float64)
        self._series: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def observe_many(self, labels: tuple, values: np.ndarray) -> None:
        if values.size == 0:
            return
        cumulative = np.searchsorted(np.sort(values), self.edges, side="right")
        with self._lock:
            series = self._series.setdefault(labels, [np.zeros(len(self.edges), np.int64), 0, 0.0])
            series[0] += cumulative
            series[1] += int(values.size)
            series[2] += float(values.sum())

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
        with self._lock:
            for labels, (cumulative, count, total) in self._series.items():
                buckets = [(str(float(e)), int(c)) for e, c in zip(self.edges, cumulative)] + [("+Inf", count)]
                family.add_metric(list(labels), buckets, total)
        yield family


class LabelBudget:
    """At most ``limit`` distinct values of one label (a plugin's ``Hello.engine``): a value is held
    while a stream uses it; a value no stream holds keeps its series (a dashboard sees it go to 0)
    until a new value needs its slot, when ``on_reclaim(value)`` removes them. Values beyond the
    budget, or not label-shaped (length, characters), share the label ``other``."""

    OTHER = "other"
    SHAPE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")

    def __init__(self, limit: int, on_reclaim) -> None:
        self.limit, self._on_reclaim = limit, on_reclaim
        self._holders: dict[str, int] = {}  # value -> streams holding it (0: idle, reclaimable)
        self._idle: OrderedDict[str, None] = OrderedDict()  # idle values, least recently released first
        self.lock = threading.Lock()  # held while a label's series are written or removed

    def acquire(self, value: str) -> str:
        with self.lock:
            if not self.SHAPE.fullmatch(value) or value == self.OTHER:
                return self.OTHER
            if value not in self._holders:
                if len(self._holders) >= self.limit:
                    if not self._idle:
                        return self.OTHER
                    old, _ = self._idle.popitem(last=False)
                    del self._holders[old]
                    self._on_reclaim(old)
                self._holders[value] = 0
            self._holders[value] += 1
            self._idle.pop(value, None)
            return value

    def release(self, label: str) -> None:
        with self.lock:
            if label in self._holders and self._holders[label] > 0:
                self._holders[label] -= 1
                if self._holders[label] == 0:
                    self._idle[label] = None

    def known(self, label: str) -> bool:
        """Whether series of ``label`` may be written (not reclaimed since it was acquired); hold
        ``lock`` from this check until the writes are done."""
        return label == self.OTHER or label in self._holders


class SidecarMetrics:
    """Every metric the sidecar exports, on its own registry."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None, max_engine_labels: int = 16) -> None:
        self.model_name = model_name
        r = self.registry = registry or CollectorRegistry()
        p = "featurewatch_"
        self.batches_received = Counter(p + "batches_received", "Activation batches received from plugins.", ["model_name", "engine"], registry=r)
        self.batches_dropped = Counter(p + "batches_dropped", "Activation batches rejected or dropped, by reason.", ["reason"], registry=r)
        self.bytes_received = Counter(p + "received_bytes", "Activation payload bytes accepted.", ["model_name"], registry=r)
        self.tokens_processed = Counter(p + "tokens_processed", "Token rows evaluated, per layer and scope.", ["model_name", "layer", "scope"], registry=r)
        self.tokens_deduplicated = Counter(p + "tokens_deduplicated", "Token rows skipped as already seen (preemption, re-sends).", ["model_name"], registry=r)
        self.feature_active = Counter(p + "feature_active_tokens", "Tokens on which a rule-referenced SAE feature was active (> 0).", ["model_name", "source", "feature"], registry=r)
        self.probe_score = BatchHistogram(p + "probe_score", "Per-token calibrated probe probability.", ("model_name", "probe"), SCORE_BUCKETS)
        r.register(self.probe_score)
        self.rule_matched = Counter(p + "rule_matched_tokens", "Tokens in a rule's scope on which its window's condition held (the value above the threshold; for an EMA window, the average).", ["model_name", "rule"], registry=r)
        self.alerts = Counter(p + "alerts", "Rules fired (once per request), with trace-id exemplars.", ["model_name", "rule", "severity"], registry=r)
        self.rule_info = Gauge(p + "rule_info", "Loaded rules and their routing labels (always 1).", ["rule", "severity", "owner", "signal"], registry=r)
        self.rules_version = Gauge(p + "rules_version", "Version of the rule set in force.", registry=r)
        self.rule_reloads = Counter(p + "rule_reloads", "Rule reload attempts by result.", ["result"], registry=r)
        self.steering_actions = Counter(p + "steering_actions", "Steering directives issued or policies applied (mode=enforce), "
                                        "or computed and audited only (mode=shadow: never sent).",
                                        ["model_name", "rule", "action", "trigger", "mode"], registry=r)
        self.steering_enabled = Gauge(p + "steering_enabled", "1 when steering is enabled (the kill switch is off).", registry=r)
        self.steering_failure_mode = Gauge(p + "steering_failure_mode", "Steering failure mode in force (1 on the active mode).", ["mode"], registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Items waiting in a pipeline stage.", ["stage"], registry=r)
        self.queue_capacity = Gauge(p + "queue_capacity", "Capacity of a pipeline stage queue.", ["stage"], registry=r)
        self.encode_seconds = Histogram(p + "encode_seconds", "Encode time per batch and layer.", ["layer"], buckets=LATENCY_BUCKETS, registry=r)
        self.token_to_verdict = Histogram(p + "token_to_verdict_seconds", "From capture in the worker to evaluated verdict.", buckets=LATENCY_BUCKETS, registry=r)
        self.steering_decision = Histogram(p + "steering_decision_seconds", "From capture of the firing token to directive sent.", buckets=LATENCY_BUCKETS, registry=r)
        self.events = Counter(p + "events", "Alert/audit events written to the event store.", ["kind"], registry=r)
        self.events_dropped = Counter(p + "events_dropped", "Events that could not be written, by reason.", ["reason"], registry=r)
        self.store_errors = Counter(p + "store_errors", "Errors talking to a store.", ["store", "op"], registry=r)
        self.requests = Counter(p + "requests", "Requests seen (RequestStart).", ["model_name"], registry=r)
        self.requests_tracked = Gauge(p + "requests_tracked", "Requests with evaluation state in memory.", registry=r)
        self.requests_evicted = Counter(p + "requests_evicted", "Request states evicted (table full or idle).", ["reason"], registry=r)
        self.plugin_connected = Gauge(p + "plugin_connected", "Plugin streams connected.", ["model_name", "engine"], registry=r)
        self.plugin_dropped = Counter(p + "plugin_batches_dropped", "Batches the plugin dropped before sending (queue full).", ["model_name", "engine"], registry=r)
        self.plugin_enqueue_sum = Counter(p + "plugin_enqueue_seconds", "Time the forward pass spent enqueueing batches for the sidecar.", ["model_name", "engine"], registry=r)
        self.plugin_enqueue_count = Counter(p + "plugin_enqueued_batches", "Batches enqueued by the plugin.", ["model_name", "engine"], registry=r)
        self.plugin_reconnects = Counter(p + "plugin_reconnects", "Plugin reconnects to the sidecar.", ["model_name", "engine"], registry=r)
        self.plugin_cached_tokens = Counter(p + "plugin_cached_prompt_tokens", "Prompt tokens served from prefix cache, never tapped.", ["model_name", "engine"], registry=r)
        self.gc_pause = Histogram(p + "gc_pause_seconds", "Python garbage-collector pauses (they stop every thread), by generation.", ["generation"], buckets=LATENCY_BUCKETS, registry=r)
        self._gc_started: float | None = None
        self.plugin_queue_depth = Gauge(p + "plugin_queue_depth", "Plugin send queue depth.", ["model_name", "engine"], registry=r)
        # ingest bounds (issue 10): rows one request's bad data cost, streams and replies given up
        self.tokens_dropped = Counter(p + "tokens_dropped", "Token rows left out of evaluation (a request's position out of "
                                      "range, non-finite activations), by reason.", ["reason"], registry=r)
        self.plugin_streams_ended = Counter(p + "plugin_streams_ended", "Plugin streams that ended, by reason (plugin_closed, "
                                            "aborted: cancelled, connection lost or a message over the gRPC size limit; "
                                            "refusals; outbox_full).", ["reason"], registry=r)
        self.outbox_dropped = Counter(p + "outbox_dropped", "Replies to a plugin dropped because its outbox was full (a plugin "
                                      "that does not read), by kind.", ["kind"], registry=r)
        self.engines = LabelBudget(max_engine_labels, self._remove_engine)
        # issue 16: steering units, where the rules in force came from, a plugin serving another model name
        self.residual_norm = Gauge(p + "residual_norm", "Median L2 norm of the residual stream at a layer, measured from live "
                                   "traffic no steering touched: the unit of add.scale_unit residual_norm.",
                                   ["model_name", "layer"], registry=r)
        self.steering_withheld = Counter(p + "steering_withheld_actions", "Steering actions not sent, by reason "
                                         "(residual_norm_unknown: too little traffic measured on the layer yet; "
                                         "out_of_bounds: the resolved scale is beyond the steering bound; nonfinite: a value not finite "
                                         "in float32).",
                                         ["reason"], registry=r)
        self.rules_source = Gauge(p + "rules_source", "Where the rules in force came from (always 1): source file (the "
                                  "rules_file, origin its path), admin (rules apply, origin the author) or none; store "
                                  "memory or redis.", ["source", "origin", "store"], registry=r)
        self.plugin_model_mismatch = Gauge(p + "plugin_model_name_mismatch", "Connected plugin streams whose vLLM served "
                                           "model name differs from this sidecar's model_name (their metrics do not "
                                           "join on model_name).", registry=r)
        # issue 11: tokens the plugin's forward actually steered (after its guard), per policy / rule
        self.plugin_tokens_steered = Counter(p + "plugin_tokens_steered", "Tokens the plugin's forward actually steered "
                                             "(rows its finiteness guard refused not counted), per always-on policy "
                                             "(kind=policy) or rule of a directive (kind=rule); names beyond the bound "
                                             "share name=other.", ["model_name", "engine", "kind", "name"], registry=r)
        self._steered_names = {"policy": set(), "rule": set()}  # label values in use, bounded (STEERED_NAMES)
        self._steered_series: dict[str, set] = {}  # engine -> (kind, name) series, removed with the engine label
        self.plugin_counts = PluginCounts(self.PLUGIN_IDENTITIES)  # per plugin process: its last cumulative counts

    ENGINE_METRICS = ("batches_received", "plugin_connected", "plugin_dropped", "plugin_enqueue_sum", "plugin_enqueue_count",
                      "plugin_reconnects", "plugin_cached_tokens", "plugin_queue_depth")

    def _remove_engine(self, engine: str) -> None:
        """An engine label reclaimed from the budget: its series go away."""
        for name in self.ENGINE_METRICS:
            getattr(self, name).remove(self.model_name, engine)
        for kind, name in self._steered_series.pop(engine, ()):
            self.plugin_tokens_steered.remove(self.model_name, engine, kind, name)
        self.plugin_counts.forget_label(engine)  # a process back under a new label counts its totals again

    def watch_gc(self) -> None:
        """Time every garbage collection: a pause stalls the receive loop and the pipeline alike."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - self._gc_started)
            self._gc_started = None

    def set_rules(self, rules) -> None:
        """Replace the rule_info series with the rules now in force."""
        self.rule_info.clear()
        for rule in rules.rules:
            signal = f"{rule.key.source}:{rule.key.label}"
            self.rule_info.labels(rule.name, rule.severity, rule.labels.get("owner", ""), signal).set(1)
        self.rules_version.set(rules.version)

    def set_rules_source(self, origin) -> None:
        """One series: where the rules in force came from (a RulesOrigin)."""
        self.rules_source.clear()
        self.rules_source.labels(origin.source, origin.origin[:256], origin.store).set(1)

    def set_steering(self, enabled: bool, failure_mode: str) -> None:
        self.steering_enabled.set(1 if enabled else 0)
        for mode in ("open", "closed"):
            self.steering_failure_mode.labels(mode).set(1 if mode == failure_mode else 0)

    PLUGIN_IDENTITIES = 1024  # plugin processes whose last cumulative counts are kept (least recent forgotten)
    STEERED_NAMES = 64  # distinct policy (and rule) names exported per kind; beyond: name="other"
    # PluginStats field -> the counter it is exported as; the other cumulative fields only tell a restart
    PLUGIN_COUNTERS = {"batches_dropped_queue_full": "plugin_dropped", "enqueue_seconds_sum": "plugin_enqueue_sum",
                       "enqueue_count": "plugin_enqueue_count", "reconnects": "plugin_reconnects",
                       "cached_prompt_tokens_untapped": "plugin_cached_tokens"}
    PLUGIN_TOTALS = ("batches_enqueued", "batches_sent", "tokens_tapped", "steering_rows_applied", "directives_rejected")

    def plugin_stats(self, engine: str, stats, stream=None, instance: str = "") -> None:
        """PluginStats are cumulative per plugin process: export what grew since the last report of
        this process (``instance``: the Hello's engine|instance, kept across its reconnects; without
        one, each ``stream`` counts on its own). See monitor.export.plugin_stats for the rule."""
        identity = ("instance", instance) if instance else ("stream", stream) if stream is not None else ("engine", engine)
        with self.engines.lock:
            if not self.engines.known(engine):  # the stream is gone and its label reclaimed: no series may come back
                return
            grew = self.plugin_counts.increases(identity, engine, stream or 0, self._cumulative(stats))
            for (kind, name), delta in grew.items():
                if kind == "field" and name in self.PLUGIN_COUNTERS:
                    getattr(self, self.PLUGIN_COUNTERS[name]).labels(self.model_name, engine).inc(delta)
                elif kind in ("policy", "rule"):
                    self.plugin_tokens_steered.labels(self.model_name, engine, kind, name).inc(delta)
                    self._steered_series.setdefault(engine, set()).add((kind, name))
            self.plugin_queue_depth.labels(self.model_name, engine).set(stats.queue_depth)

    def _cumulative(self, stats) -> dict:
        """A report's cumulative counts by key; tokens steered summed per exported name (at most
        STEERED_NAMES + 1 per kind), a float that is not finite or is negative left out."""
        counts = {}
        for field in (*self.PLUGIN_COUNTERS, *self.PLUGIN_TOTALS):
            value = getattr(stats, field)
            if math.isfinite(value) and value >= 0:
                counts[("field", field)] = value
        for kind, steered in (("policy", stats.policy_tokens_steered), ("rule", stats.rule_tokens_steered)):
            for name, value in steered.items():
                if not value:  # no label taken for a name that never steered
                    continue
                key = (kind, self._steered_label(kind, name))
                counts[key] = counts.get(key, 0) + value
        return counts

    def _steered_label(self, kind: str, name: str) -> str:
        names = self._steered_names[kind]
        if name in names:
            return name
        if not LabelBudget.SHAPE.fullmatch(name) or name == LabelBudget.OTHER or len(names) >= self.STEERED_NAMES:
            return LabelBudget.OTHER
        names.add(name)
        return name

    def plugin_restarted(self, engine: str, stream=None) -> None:
        """A new stream (or one gone): a plugin without an instance in its Hello counts per stream,
        from zero. Processes that name themselves keep their counts across streams."""
        with self.engines.lock:
            self.plugin_counts.forget(("stream", stream) if stream is not None else ("engine", engine))
