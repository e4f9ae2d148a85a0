"""Registration of the items module."""

from core.module import Module
from modules.items.container import ItemsContainer
from modules.items.models import ItemRow
from modules.items.router import router

MODULE = Module(name="items", container=ItemsContainer, router=router, models=(ItemRow,))
