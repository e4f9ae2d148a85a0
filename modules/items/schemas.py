"""HTTP models of the items API.

Text fields take the edge rules of ``core.edge.types`` (a name is one line, a description may hold
lines; no control characters) and the price stays inside its ``BigInteger`` column, so such input
is a 422 before anything reaches the database.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from core.edge.openapi import partial_update
from core.edge.types import JSON_INTEGER, MULTI_LINE, ONE_LINE, Int64
from modules.items.domain import CURRENCIES, DESCRIPTION_MAX, NAME_MAX, PRICE_MAX, is_currency


def _currency(code: str) -> str:
    code = code.upper()
    if not is_currency(code):
        raise ValueError("must be an active ISO 4217 currency code, e.g. EUR")
    return code


Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=NAME_MAX),
                 ONE_LINE.filled(), Field(examples=["Brass desk lamp"])]
Description = Annotated[str, StringConstraints(strip_whitespace=True, max_length=DESCRIPTION_MAX), MULTI_LINE,
                        Field(examples=["Solid brass.\nShade not included."])]
# PRICE_MAX (domain) is far inside the column's range; Int64 states the column.
Price = Annotated[Int64, Field(ge=0, le=PRICE_MAX, description="integer minor units, e.g. cents",
                               examples=[1999]), JSON_INTEGER]
# The document lists the codes the server accepts (the domain's CURRENCIES); a lower-case code is
# accepted too and stored upper-case, but clients are told the canonical form.
Currency = Annotated[str, StringConstraints(min_length=3, max_length=3), ONE_LINE, AfterValidator(_currency),
                     Field(examples=["EUR"], description="an active ISO 4217 code (case-insensitive)",
                           json_schema_extra={"enum": sorted(CURRENCIES)})]


class ItemCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    description: Description = ""
    price: Price
    currency: Currency


class ItemUpdate(BaseModel):
    """Partial update: only the fields sent change; none of them may be null."""

    # The fields are optional but not nullable, and one at least is sent: the document says so (no null
    # alternative, minProperties).
    model_config = ConfigDict(extra="forbid", json_schema_extra=partial_update)

    name: Name | None = None
    description: Description | None = None
    price: Price | None = None
    currency: Currency | None = None

    @model_validator(mode="after")
    def _not_empty_nor_null(self) -> ItemUpdate:
        if not self.model_fields_set:
            raise ValueError("send at least one of name, description, price, currency")
        nulls = [name for name in self.model_fields_set if getattr(self, name) is None]
        if nulls:
            raise ValueError(f"{', '.join(sorted(nulls))} cannot be null")
        return self


class ItemRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    description: str
    price: int
    currency: str
    created_at: datetime
    updated_at: datetime


class ItemPage(BaseModel):
    items: list[ItemRead]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")
