"""Registration of the billing module."""

from core.module import Module
from modules.billing.container import BillingContainer
from modules.billing.models import InvoiceLineRow, InvoiceRow, PaymentRow
from modules.billing.public import PaymentSucceeded
from modules.billing.router import router
from modules.billing.tasks import charge_payment, reconcile_payments, send_receipt

MODULE = Module(
    name="billing",
    container=BillingContainer,
    router=router,
    tasks=(charge_payment,),
    models=(InvoiceRow, InvoiceLineRow, PaymentRow),
    depends_on=("users", "items"),
    subscriptions={PaymentSucceeded: (send_receipt,)},
    periodic=(reconcile_payments,),
)
