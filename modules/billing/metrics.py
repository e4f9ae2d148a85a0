"""Billing's own metrics, on the process's registry (the worker's ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from modules.billing.domain import ReconcileOutcome


class ReconcileMetrics:
    """``atrium_payments_reconciled_total{outcome}``: payments the reconciler found pending past the
    threshold, by what it did (``ReconcileOutcome``); counted once the outcome is committed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reconciled = Counter(
            "atrium_payments_reconciled", "Payments found pending past billing_reconcile_after_seconds, "
            "by what the reconciler did.", ["outcome"], registry=registry,
        )
        for outcome in ReconcileOutcome:  # every series from the start, at 0
            self.reconciled.labels(outcome.value)

    def count(self, outcome: ReconcileOutcome) -> None:
        self.reconciled.labels(outcome.value).inc()
