"""Items HTTP API: a public catalog, written by admins."""

from __future__ import annotations

import hashlib
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from core.edge.auth import AdminPrincipal
from core.edge.errors import Unprocessable
from core.edge.openapi import ID, errors, link, links
from core.edge.pagination import Cursor
from core.edge.provided import Provided
from core.edge.routes import DbSession, ReadSession, TransactionalRoute
from core.edge.types import Int64, Line
from modules.items.schemas import Currency, ItemCreate, ItemPage, ItemRead, ItemUpdate
from modules.items.service import ItemFilters, ItemService

router = APIRouter(prefix="/items", tags=["items"], route_class=TransactionalRoute)
Service = Annotated[ItemService, Provided("items.service")]

_ADMIN = {403: "forbidden"}  # not an admin (a missing or dead token: 401, added with the bearer scheme)
_NOT_FOUND = {404: "not_found"}
_JSON = "application/json"


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    candidates = {c.strip().removeprefix("W/") for c in if_none_match.split(",")}
    return "*" in candidates or etag in candidates


_CREATED = links(
    201,
    ReadItem=link("items.read_item", "The new item.", item_id=ID),
    UpdateItem=link("items.update_item", "Change the new item.", item_id=ID),
    DeleteItem=link("items.delete_item", "Remove the new item.", item_id=ID),
)


@router.post("", status_code=201, response_model=ItemRead, responses={**errors(_ADMIN), **_CREATED})
async def create_item(
    body: ItemCreate,
    _: AdminPrincipal,
    session: DbSession,
    service: Service,
    request: Request,
    response: Response,
) -> ItemRead:
    """Add an item (admins only). Prices are integer minor units."""
    item = await service.create(session, body)
    # The new item's path: this one plus its id. A path-absolute reference (RFC 9110 §10.2.2) resolves
    # against the URL the client used, behind any proxy; url_for("read_item") would walk the route
    # table and request.url re-parses the Host header, ~8 µs of a POST.
    response.headers["Location"] = f"{request.scope['path'].rstrip('/')}/{item.id}"
    return ItemRead.model_validate(item)


@router.get("", response_model=ItemPage, responses=errors({400: "invalid_cursor"}))
async def list_items(
    session: ReadSession,  # a public catalog page may lag a write by the replication delay
    service: Service,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[Cursor | None, Query()] = None,
    q: Annotated[Line | None, Query(min_length=1, max_length=200, description="name prefix")] = None,
    # Bounded to the price column (bigint): a larger number would overflow in the driver.
    min_price: Annotated[Int64 | None, Query(ge=0)] = None,
    max_price: Annotated[Int64 | None, Query(ge=0)] = None,
    currency: Annotated[Currency | None, Query()] = None,
) -> ItemPage:
    """Items in creation order, keyset-paginated; filters: name prefix, price range, currency."""
    if min_price is not None and max_price is not None and min_price > max_price:
        raise Unprocessable(
            "min_price must not exceed max_price.", details={"min_price": min_price, "max_price": max_price}
        )
    filters = ItemFilters(q=q, min_price=min_price, max_price=max_price, currency=currency)
    items, next_cursor = await service.list(session, filters, limit, cursor)
    return ItemPage(items=[ItemRead.model_validate(i) for i in items], next_cursor=next_cursor)


# If-None-Match is read from the request rather than declared as a Header() parameter, which costs
# FastAPI's parameter machinery ~25 µs on the hottest route (bench/README.md); documented the same.
_IF_NONE_MATCH = {"in": "header", "name": "if-none-match", "required": False,
                  "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "If-None-Match"}}


@router.get(
    "/{item_id}",
    response_model=ItemRead,
    responses={304: {"description": "not modified"}, **errors(_NOT_FOUND)},
    openapi_extra={"parameters": [_IF_NONE_MATCH]},
)
async def read_item(item_id: uuid.UUID, service: Service, request: Request) -> Response:
    """One item, served from the cache when warm; supports ``If-None-Match`` (304)."""
    body = await service.read_json(item_id)
    etag = etag_of(body)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=_JSON, headers=headers)


@router.patch("/{item_id}", response_model=ItemRead, responses=errors({**_ADMIN, **_NOT_FOUND}))
async def update_item(
    item_id: uuid.UUID, body: ItemUpdate, _: AdminPrincipal, session: DbSession, service: Service
) -> ItemRead:
    """Change some fields of an item (admins only); the cached copy is invalidated on commit."""
    return ItemRead.model_validate(await service.update(session, item_id, body))


@router.delete("/{item_id}", status_code=204, responses=errors({**_ADMIN, **_NOT_FOUND}))
async def delete_item(
    item_id: uuid.UUID, _: AdminPrincipal, session: DbSession, service: Service
) -> Response:
    """Remove an item (admins only)."""
    await service.delete(session, item_id)
    return Response(status_code=204)
