"""OpenTelemetry spans for alerts and steering, siblings of vLLM's `llm_request` span.

vLLM parents its request span to the incoming `traceparent`; we parent ours to the same context, so
a trace shows the request, the alert and the steering decision side by side (GenAI security
conventions: `gen_ai.security.decision.type` = warn/audit for alerts, modify for steering).
"""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()


def trace_id_of(traceparent: str) -> str:
    """The 32-hex trace id of a W3C traceparent, or '' (used as the metrics exemplar)."""
    parts = traceparent.split("-") if traceparent else []
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


class Tracing:
    def __init__(self, config, model_name: str) -> None:
        self.model_name = model_name
        self.memory_exporter = None
        self.provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        if config.exporter == "console":
            self.provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint)))
        elif config.exporter == "memory":
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            self.memory_exporter = InMemorySpanExporter()
            self.provider.add_span_processor(SimpleSpanProcessor(self.memory_exporter))
        self.enabled = config.exporter != "none"
        self.tracer = self.provider.get_tracer("featurewatch")

    def _span(self, name: str, traceparent: str, attributes: dict) -> None:
        if not self.enabled:
            return
        context = _propagator.extract({"traceparent": traceparent}) if traceparent else None
        with self.tracer.start_as_current_span(name, context=context, attributes=attributes):
            pass

    def alert(self, verdict) -> None:
        rule = verdict.rule
        self._span("featurewatch.alert", verdict.request.traceparent, {
            "gen_ai.security.decision.type": "warn" if rule.severity != "info" else "audit",
            "gen_ai.request.model": self.model_name,
            "featurewatch.rule": rule.name, "featurewatch.severity": rule.severity,
            "featurewatch.signal": f"{rule.key.source}:{rule.key.label}",
            "featurewatch.value": verdict.value, "featurewatch.position": verdict.position,
            "featurewatch.request_id": verdict.request.request_id,
        })

    def steering(self, verdict, directive) -> None:
        self._span("featurewatch.steer", verdict.request.traceparent, {
            "gen_ai.security.decision.type": "modify", "gen_ai.request.model": self.model_name,
            "featurewatch.rule": verdict.rule.name, "featurewatch.from_position": directive.from_position,
            "featurewatch.request_id": verdict.request.request_id,
        })

    def shutdown(self) -> None:
        self.provider.shutdown()


