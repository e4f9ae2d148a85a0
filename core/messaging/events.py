"""Integration events: the facts one module publishes for others, carried by the outbox."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from core.db.base import new_id, utcnow


class IntegrationEvent(BaseModel):
    """Base of every published event; subclasses set ``name = "<module>.<EventName>"``."""

    model_config = ConfigDict(frozen=True)

    name: ClassVar[str]
    event_id: uuid.UUID = Field(default_factory=new_id)
    occurred_at: datetime = Field(default_factory=utcnow)
