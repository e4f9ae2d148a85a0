"""Billing jobs: charge a payment, mail its receipt."""

from __future__ import annotations

from core.messaging.queue import JobContext, task
from modules.billing.public import PaymentSucceeded
from modules.billing.schemas import ChargePayment


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
