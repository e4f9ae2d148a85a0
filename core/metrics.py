"""Prometheus metrics on ``/metrics`` through prometheus-fastapi-instrumentator.

Each container owns a registry (with the process and GC collectors added back), so several
apps in one process — tests build many — never collide on metric names, and module metrics
(cache hits, jobs) land on the same ``/metrics`` page as the HTTP ones.
"""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_fastapi_instrumentator import Instrumentator


def new_registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def install_metrics(app: FastAPI, registry: CollectorRegistry) -> CollectorRegistry:
    instrumentator = Instrumentator(
        should_group_status_codes=False,
        should_ignore_untemplated=True,  # unknown paths would explode label cardinality
        excluded_handlers=["/metrics", "/health/live", "/health/ready"],
        registry=registry,
    )
    instrumentator.instrument(app).expose(app, endpoint="/metrics", include_in_schema=False)
    app.state.metrics_registry = registry
    return registry
