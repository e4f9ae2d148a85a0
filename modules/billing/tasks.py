"""Billing jobs: charge a payment, mail its receipt; and the periodic payment reconciler."""

from __future__ import annotations

from loguru import logger

from core.messaging.periodic import PeriodicContext, periodic
from core.messaging.queue import JobContext, task
from modules.billing.adapters.gateway import GatewayError
from modules.billing.domain import ReconcileOutcome
from modules.billing.public import PaymentSucceeded
from modules.billing.schemas import ChargePayment

RECONCILE_BATCH = 100  # payments per run at most; the rest wait for the next run


async def _payment_failed_for_good(ctx: JobContext, payload: ChargePayment, error: BaseException) -> None:
    await ctx.container.payments().give_up(ctx.session, payload.payment_id)


@task("billing.charge_payment", on_exhausted=_payment_failed_for_good)
async def charge_payment(ctx: JobContext, payload: ChargePayment) -> None:
    """Charge the gateway once; gateway outages raise and are retried with backoff."""
    await ctx.container.payments().charge(ctx.session, payload.payment_id)


@task("billing.send_receipt")
async def send_receipt(ctx: JobContext, event: PaymentSucceeded) -> None:
    """Mail the receipt of a successful payment."""
    await ctx.container.payments().send_receipt(ctx.session, event)


@periodic("billing.reconcile_payments", every="billing_reconcile_interval_seconds")
async def reconcile_payments(ctx: PeriodicContext) -> None:
    """Finish payments pending past ``billing_reconcile_after_seconds``, one transaction each."""
    payments, metrics = ctx.container.payments(), ctx.container.reconcile_metrics()
    after = ctx.container.settings().billing_reconcile_after_seconds
    async with ctx.unit_of_work() as session:
        due = await payments.stale_pending(session, after, RECONCILE_BATCH)
    for payment_id in due:
        try:
            async with ctx.unit_of_work() as session:
                outcome = await payments.reconcile(session, payment_id)
        except GatewayError as exc:  # rolled back, still pending: the next run asks again
            metrics.count(ReconcileOutcome.GATEWAY_UNAVAILABLE)
            logger.warning("reconcile: payment {} stays pending, the gateway did not answer: {}",
                           payment_id, exc)
            return
        if outcome is not None:  # counted once committed
            metrics.count(outcome)
            logger.info("reconcile: payment {}: {}", payment_id, outcome.value)
