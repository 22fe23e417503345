"""The export stage: Prometheus metrics, alert/audit events, OpenTelemetry spans."""
