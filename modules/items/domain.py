"""Items: catalog rules. Pure Python; prices are integer minor units of an ISO 4217 currency."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from core.edge.errors import NotFound

NAME_MAX = 200
DESCRIPTION_MAX = 4000
PRICE_MAX = 10**13  # 100 billion in a 2-decimal currency; fits a 64-bit integer with room

# Active ISO 4217 codes (funds and precious metals left out: items are priced in money).
CURRENCIES = frozenset(
    [
        "AED",
        "AFN",
        "ALL",
        "AMD",
        "ANG",
        "AOA",
        "ARS",
        "AUD",
        "AWG",
        "AZN",
        "BAM",
        "BBD",
        "BDT",
        "BGN",
        "BHD",
        "BIF",
        "BMD",
        "BND",
        "BOB",
        "BRL",
        "BSD",
        "BTN",
        "BWP",
        "BYN",
        "BZD",
        "CAD",
        "CDF",
        "CHF",
        "CLP",
        "CNY",
        "COP",
        "CRC",
        "CUP",
        "CVE",
        "CZK",
        "DJF",
        "DKK",
        "DOP",
        "DZD",
        "EGP",
        "ERN",
        "ETB",
        "EUR",
        "FJD",
        "FKP",
        "GBP",
        "GEL",
        "GHS",
        "GIP",
        "GMD",
        "GNF",
        "GTQ",
        "GYD",
        "HKD",
        "HNL",
        "HTG",
        "HUF",
        "IDR",
        "ILS",
        "INR",
        "IQD",
        "IRR",
        "ISK",
        "JMD",
        "JOD",
        "JPY",
        "KES",
        "KGS",
        "KHR",
        "KMF",
        "KPW",
        "KRW",
        "KWD",
        "KYD",
        "KZT",
        "LAK",
        "LBP",
        "LKR",
        "LRD",
        "LSL",
        "LYD",
        "MAD",
        "MDL",
        "MGA",
        "MKD",
        "MMK",
        "MNT",
        "MOP",
        "MRU",
        "MUR",
        "MVR",
        "MWK",
        "MXN",
        "MYR",
        "MZN",
        "NAD",
        "NGN",
        "NIO",
        "NOK",
        "NPR",
        "NZD",
        "OMR",
        "PAB",
        "PEN",
        "PGK",
        "PHP",
        "PKR",
        "PLN",
        "PYG",
        "QAR",
        "RON",
        "RSD",
        "RUB",
        "RWF",
        "SAR",
        "SBD",
        "SCR",
        "SDG",
        "SEK",
        "SGD",
        "SHP",
        "SLE",
        "SOS",
        "SRD",
        "SSP",
        "STN",
        "SVC",
        "SYP",
        "SZL",
        "THB",
        "TJS",
        "TMT",
        "TND",
        "TOP",
        "TRY",
        "TTD",
        "TWD",
        "TZS",
        "UAH",
        "UGX",
        "USD",
        "UYU",
        "UZS",
        "VES",
        "VND",
        "VUV",
        "WST",
        "XAF",
        "XCD",
        "XOF",
        "XPF",
        "YER",
        "ZAR",
        "ZMW",
        "ZWG",
    ]
)


@dataclass(frozen=True, slots=True)
class Item:
    id: uuid.UUID
    name: str
    description: str
    price: int
    currency: str
    version: int
    created_at: datetime
    updated_at: datetime


def is_currency(code: str) -> bool:
    return code in CURRENCIES


def name_key(name: str) -> str:
    """The form names are searched in: case-folded, inner whitespace collapsed.

    Case folding can lengthen a name ("ß" -> "ss"); the key is cut to ``NAME_MAX`` and so is every
    searched prefix, so prefix matching stays consistent.
    """
    return " ".join(name.split()).casefold()[:NAME_MAX]


class ItemNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Item not found.")
