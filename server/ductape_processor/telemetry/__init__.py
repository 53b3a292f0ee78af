"""OpenTelemetry set-up, per-call context and structured logging."""
