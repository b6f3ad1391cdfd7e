"""The metrics-only listener (`--metrics-port`): GET /metrics and nothing else.

A port that Prometheus (a PodMonitor on port `metrics`, 9127 as CloudNativePG's
pooler uses) may reach without also reaching the pools API or the
state-changing endpoints: every other path is a JSON 404, another method on
/metrics a JSON 405. It shares the main app's registry, so both ports report
the same collection counters.
"""
from __future__ import annotations

from flask import Flask, Response, jsonify
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector,
                               generate_latest)
from werkzeug.exceptions import HTTPException

from .console import Console
from .metrics import PoolerCollector

DEFAULT_METRICS_PORT = 9127


def metrics_registry(console: Console, legacy: bool = False) -> CollectorRegistry:
    """A registry whose collector asks `console` afresh at each scrape, plus the
    sidecar's own `process_*` (the pooler's are `pgbouncer_process_*`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolerCollector(console, legacy))
    ProcessCollector(registry=registry)
    return registry


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def create_metrics_app(registry: CollectorRegistry) -> Flask:
    app = Flask("sidecar-metrics")

    @app.get("/metrics")
    def metrics() -> Response:
        return metrics_response(registry)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[Response, int]:
        # JSON, never Werkzeug's HTML page; the reason says what this port serves.
        code = e.code or 500
        reason = "this port serves only GET /metrics" if code in (404, 405) else e.description
        resp = jsonify(status=(e.name or "error").lower(), reason=reason)
        for key, value in e.get_headers():
            if key.lower() == "allow":
                resp.headers[key] = value
        return resp, code

    return app
