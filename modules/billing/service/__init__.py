"""Billing use cases, one file per aggregate: invoices and payments."""
