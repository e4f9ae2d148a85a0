"""Tables owned by the items module."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from core.db.base import Base, new_id, utcnow


class ItemRow(Base):
    __tablename__ = "items"
    __table_args__ = (
        # Prefix search on the case-folded name, in keyset order (PostgreSQL needs the
        # pattern operator class for LIKE 'abc%' to use a b-tree under a non-C collation).
        Index("ix_items_name_key", "name_key", "id", postgresql_ops={"name_key": "varchar_pattern_ops"}),
        Index("ix_items_price", "price", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    name_key: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    price: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    version: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
