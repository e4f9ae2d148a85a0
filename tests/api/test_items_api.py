"""The items HTTP contract (DESIGN.md §5), on both profiles.

Items written by one test stay in the profile's database for the rest of the session, so every
test that lists gives its items a name prefix of its own and filters with ``q``.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from core.edge.pagination import CursorCodec
from core.messaging.outbox import OutboxMessage
from modules.items.domain import DESCRIPTION_MAX, NAME_MAX, PRICE_MAX
from modules.items.models import ItemRow
from tests.support.api import bearer, make_admin, sign_up
from tests.support.envelope import assert_envelope
from tests.support.stack import Stack

ITEMS = "/api/v1/items"
FIELDS = {"id", "name", "description", "price", "currency", "created_at", "updated_at"}
PRICE_CHANGED = "items.ItemPriceChanged"


@pytest.fixture(scope="session")
async def admin(stack: Stack) -> dict[str, str]:
    """Authorization headers of an admin of this profile."""
    return bearer(await make_admin(stack))


@pytest.fixture(scope="session")
async def user(stack: Stack) -> dict[str, str]:
    """Authorization headers of an ordinary user of this profile."""
    _, token = await sign_up(stack.client)
    return bearer(token)


def prefix(tag: str = "item") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def item_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": prefix("Lamp"),
        "description": "A desk lamp",
        "price": 1999,
        "currency": "EUR",
    }
    body.update(overrides)
    return body


async def create(client: httpx.AsyncClient, headers: dict[str, str], **overrides: Any) -> dict[str, Any]:
    response = await client.post(ITEMS, json=item_body(**overrides), headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def get(client: httpx.AsyncClient, item_id: str, **headers: str) -> httpx.Response:
    return await client.get(f"{ITEMS}/{item_id}", headers=headers)


async def list_ids(client: httpx.AsyncClient, **params: Any) -> list[str]:
    """Every id the listing returns for ``params``, following cursors to the end."""
    ids: list[str] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(ITEMS, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        ids += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


def cache_counts(metrics_text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "atrium_cache_requests_total" and sample.labels.get("cache") == "items":
                counts[sample.labels["result"]] = sample.value
    return counts


async def price_events(stack: Stack, item_id: str) -> list[dict[str, Any]]:
    async with stack.container.sessions()() as session:
        rows = (
            await session.execute(
                select(OutboxMessage).where(OutboxMessage.name == PRICE_CHANGED).order_by(OutboxMessage.id)
            )
        ).scalars()
        return [r.payload for r in rows if r.payload.get("item_id") == item_id]


class TestCreate:
    async def test_an_admin_creates_an_item(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        body = item_body(name="  Brass Lamp  ", currency="eur", price=12_50)
        response = await client.post(ITEMS, json=body, headers=admin)
        assert response.status_code == 201, response.text
        item = response.json()
        assert set(item) == FIELDS
        uuid.UUID(item["id"])
        assert item["name"] == "Brass Lamp"
        assert item["description"] == "A desk lamp"
        assert item["price"] == 1250
        assert item["currency"] == "EUR"
        assert item["updated_at"] >= item["created_at"]
        # A path-absolute reference: it resolves against the URL the client used, behind any proxy.
        assert response.headers["location"] == f"{ITEMS}/{item['id']}"
        fetched = await get(client, item["id"])
        assert fetched.status_code == 200
        assert fetched.json() == item

    async def test_the_location_header_leads_to_the_item(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        response = await client.post(ITEMS, json=item_body(), headers=admin)
        assert response.status_code == 201
        followed = await client.get(response.headers["location"])
        assert followed.status_code == 200, followed.text
        assert followed.json()["id"] == response.json()["id"]

    async def test_description_is_optional(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        body = item_body()
        del body["description"]
        response = await client.post(ITEMS, json=body, headers=admin)
        assert response.status_code == 201, response.text
        assert response.json()["description"] == ""

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("name", "n" * NAME_MAX),
            ("description", "d" * DESCRIPTION_MAX),
            ("price", 0),
            ("price", PRICE_MAX),
            ("currency", "JPY"),
        ],
    )
    async def test_limits_are_inclusive(
        self, client: httpx.AsyncClient, admin: dict[str, str], field: str, value: object
    ) -> None:
        item = await create(client, admin, **{field: value})
        assert item[field] == value

    async def test_a_name_whose_case_folded_form_is_longer_is_accepted(
        self, stack: Stack, admin: dict[str, str], request: pytest.FixtureRequest
    ) -> None:
        name = "ß" * NAME_MAX
        response = await stack.client.post(ITEMS, json=item_body(name=name), headers=admin)
        assert response.status_code == 201, response.text
        listed = await stack.client.get(ITEMS, params={"q": "ss" * 5})
        assert response.json()["id"] in [i["id"] for i in listed.json()["items"]]

    async def test_an_ordinary_user_gets_403(self, client: httpx.AsyncClient, user: dict[str, str]) -> None:
        assert_envelope(await client.post(ITEMS, json=item_body(), headers=user), 403, "forbidden")

    async def test_without_a_token_is_401(self, client: httpx.AsyncClient) -> None:
        response = await client.post(ITEMS, json=item_body())
        assert_envelope(response, 401, "not_authenticated")

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("price", -1),
            ("price", 19.99),
            ("price", "1999"),
            ("price", True),
            ("price", PRICE_MAX + 1),
            ("currency", "ABC"),
            ("currency", "EU"),
            ("currency", "EURO"),
            ("currency", 978),
            ("name", ""),
            ("name", "   "),
            ("name", "n" * (NAME_MAX + 1)),
            ("description", "d" * (DESCRIPTION_MAX + 1)),
        ],
    )
    async def test_invalid_field_is_422_naming_it(
        self, client: httpx.AsyncClient, admin: dict[str, str], field: str, value: object
    ) -> None:
        response = await client.post(ITEMS, json=item_body(**{field: value}), headers=admin)
        error = assert_envelope(response, 422, "validation_error")
        assert ["body", field] in [e["loc"] for e in error["details"]["errors"]]

    async def test_an_unknown_field_is_422(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        response = await client.post(ITEMS, json=item_body(color="red"), headers=admin)
        error = assert_envelope(response, 422, "validation_error")
        assert ["body", "color"] in [e["loc"] for e in error["details"]["errors"]]

    async def test_missing_fields_are_each_reported(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        error = assert_envelope(await client.post(ITEMS, json={}, headers=admin), 422, "validation_error")
        missing = {e["loc"][-1] for e in error["details"]["errors"] if e["type"] == "missing"}
        assert missing == {"name", "price", "currency"}


class TestRead:
    async def test_returns_the_item_with_an_etag(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        item = await create(client, admin)
        response = await get(client, item["id"])  # no token: the catalog is public
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == item
        etag = response.headers["etag"]
        assert len(etag) > 2
        assert etag[0] == etag[-1] == '"'
        assert response.headers["cache-control"] == "no-cache"
        again = await get(client, item["id"])  # from the cache now
        assert again.json() == item
        assert again.headers["etag"] == etag

    @pytest.mark.parametrize(
        "header", ["{etag}", '"nope", {etag}', "{etag} , \"other\"", "W/{etag}", "*"]
    )
    async def test_if_none_match_gives_304(
        self, client: httpx.AsyncClient, admin: dict[str, str], header: str
    ) -> None:
        item = await create(client, admin)
        etag = (await get(client, item["id"])).headers["etag"]
        response = await get(client, item["id"], **{"If-None-Match": header.format(etag=etag)})
        assert response.status_code == 304
        assert response.content == b""
        assert response.headers["etag"] == etag

    async def test_a_non_matching_etag_gives_200(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        item = await create(client, admin)
        response = await get(client, item["id"], **{"If-None-Match": '"0123456789abcdef01234567"'})
        assert response.status_code == 200
        assert response.json() == item

    async def test_items_have_different_etags(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        one, two = await create(client, admin), await create(client, admin)
        first, second = await get(client, one["id"]), await get(client, two["id"])
        assert first.headers["etag"] != second.headers["etag"]

    async def test_unknown_id_is_404_every_time(self, client: httpx.AsyncClient) -> None:
        missing = str(uuid.uuid4())
        for _ in range(2):  # a miss is not cached as a hit of something
            assert_envelope(await get(client, missing), 404, "not_found")

    async def test_malformed_id_is_422(self, client: httpx.AsyncClient) -> None:
        assert_envelope(await get(client, "not-a-uuid"), 422, "validation_error")


class TestUpdate:
    async def test_changes_fields_and_a_read_right_after_sees_them(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        item = await create(client, admin, price=1000, currency="EUR")
        first = await get(client, item["id"])
        await get(client, item["id"])  # warm: the next read would be a cache hit
        changes = {"name": "Renamed lamp", "description": "", "price": 1500, "currency": "usd"}
        response = await client.patch(f"{ITEMS}/{item['id']}", json=changes, headers=admin)
        assert response.status_code == 200, response.text
        updated = response.json()
        assert set(updated) == FIELDS
        assert updated["id"] == item["id"]
        assert (updated["name"], updated["description"], updated["price"], updated["currency"]) == (
            "Renamed lamp", "", 1500, "USD"
        )
        assert updated["created_at"] == item["created_at"]
        assert datetime.fromisoformat(updated["updated_at"]) > datetime.fromisoformat(item["updated_at"])

        after = await get(client, item["id"])
        assert after.status_code == 200
        assert after.json() == updated
        assert after.headers["etag"] != first.headers["etag"]
        stale = await get(client, item["id"], **{"If-None-Match": first.headers["etag"]})
        assert stale.status_code == 200
        fresh = await get(client, item["id"], **{"If-None-Match": after.headers["etag"]})
        assert fresh.status_code == 304

    async def test_only_the_fields_sent_change(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        item = await create(client, admin)
        await get(client, item["id"])
        response = await client.patch(f"{ITEMS}/{item['id']}", json={"price": 1}, headers=admin)
        assert response.status_code == 200
        assert {k: v for k, v in response.json().items() if k not in {"price", "updated_at"}} == {
            k: v for k, v in item.items() if k not in {"price", "updated_at"}
        }
        assert (await get(client, item["id"])).json()["price"] == 1

    async def test_every_write_is_visible_to_the_next_read(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        item = await create(client, admin)
        for price in range(100, 110):
            await get(client, item["id"])
            response = await client.patch(f"{ITEMS}/{item['id']}", json={"price": price}, headers=admin)
            assert response.status_code == 200
            assert (await get(client, item["id"])).json()["price"] == price

    @pytest.mark.parametrize(
        "changes",
        [
            {},
            {"price": None},
            {"name": None},
            {"currency": None},
            {"description": None},
            {"price": -5},
            {"price": 1.5},
            {"currency": "XYZ"},
            {"name": ""},
            {"name": "n" * (NAME_MAX + 1)},
            {"colour": "red"},
        ],
    )
    async def test_invalid_changes_are_422_and_change_nothing(
        self, client: httpx.AsyncClient, admin: dict[str, str], changes: dict[str, Any]
    ) -> None:
        item = await create(client, admin)
        response = await client.patch(f"{ITEMS}/{item['id']}", json=changes, headers=admin)
        assert_envelope(response, 422, "validation_error")
        assert (await get(client, item["id"])).json() == item

    async def test_unknown_item_is_404(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        response = await client.patch(f"{ITEMS}/{uuid.uuid4()}", json={"price": 1}, headers=admin)
        assert_envelope(response, 404, "not_found")

    async def test_an_ordinary_user_gets_403_and_nothing_changes(
        self, client: httpx.AsyncClient, admin: dict[str, str], user: dict[str, str]
    ) -> None:
        item = await create(client, admin)
        response = await client.patch(f"{ITEMS}/{item['id']}", json={"price": 1}, headers=user)
        assert_envelope(response, 403, "forbidden")
        anonymous = await client.patch(f"{ITEMS}/{item['id']}", json={"price": 1})
        assert_envelope(anonymous, 401, "not_authenticated")
        assert (await get(client, item["id"])).json()["price"] == item["price"]


class TestPriceChangedEvent:
    async def test_a_price_change_writes_one_event_with_old_and_new(
        self, stack: Stack, admin: dict[str, str]
    ) -> None:
        item = await create(stack.client, admin, price=1000, currency="EUR")
        response = await stack.client.patch(f"{ITEMS}/{item['id']}", json={"price": 1200}, headers=admin)
        assert response.status_code == 200
        events = await price_events(stack, item["id"])
        assert len(events) == 1
        event = events[0]
        assert (event["old_price"], event["new_price"]) == (1000, 1200)
        assert (event["old_currency"], event["new_currency"]) == ("EUR", "EUR")

    async def test_a_currency_change_writes_one_too(self, stack: Stack, admin: dict[str, str]) -> None:
        item = await create(stack.client, admin, price=1000, currency="EUR")
        await stack.client.patch(f"{ITEMS}/{item['id']}", json={"currency": "GBP"}, headers=admin)
        events = await price_events(stack, item["id"])
        assert [(e["old_currency"], e["new_currency"], e["old_price"], e["new_price"]) for e in events] == [
            ("EUR", "GBP", 1000, 1000)
        ]

    @pytest.mark.parametrize(
        "changes", [{"name": "Only the name"}, {"description": "words"}, {"price": 1000, "currency": "EUR"}]
    )
    async def test_no_event_when_price_and_currency_stay(
        self, stack: Stack, admin: dict[str, str], changes: dict[str, Any]
    ) -> None:
        item = await create(stack.client, admin, price=1000, currency="EUR")
        response = await stack.client.patch(f"{ITEMS}/{item['id']}", json=changes, headers=admin)
        assert response.status_code == 200
        assert await price_events(stack, item["id"]) == []

    async def test_a_rejected_change_writes_no_event(self, stack: Stack, user: dict[str, str],
                                                     admin: dict[str, str]) -> None:
        item = await create(stack.client, admin, price=1000)
        await stack.client.patch(f"{ITEMS}/{item['id']}", json={"price": 5}, headers=user)
        assert await price_events(stack, item["id"]) == []


class TestDelete:
    async def test_deletes_and_a_read_right_after_is_404(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        item = await create(client, admin)
        await get(client, item["id"])
        assert (await get(client, item["id"])).status_code == 200  # warm
        response = await client.delete(f"{ITEMS}/{item['id']}", headers=admin)
        assert response.status_code == 204
        assert response.content == b""
        assert_envelope(await get(client, item["id"]), 404, "not_found")
        assert_envelope(await client.delete(f"{ITEMS}/{item['id']}", headers=admin), 404, "not_found")
        gone = await client.patch(f"{ITEMS}/{item['id']}", json={"price": 1}, headers=admin)
        assert_envelope(gone, 404, "not_found")
        assert item["id"] not in await list_ids(client, q=item["name"])

    async def test_an_ordinary_user_gets_403_and_the_item_stays(
        self, client: httpx.AsyncClient, admin: dict[str, str], user: dict[str, str]
    ) -> None:
        item = await create(client, admin)
        assert_envelope(await client.delete(f"{ITEMS}/{item['id']}", headers=user), 403, "forbidden")
        assert_envelope(await client.delete(f"{ITEMS}/{item['id']}"), 401, "not_authenticated")
        assert (await get(client, item["id"])).status_code == 200


class TestList:
    async def test_default_limit_is_20_and_the_last_page_has_no_cursor(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        tag = prefix("deflim")
        created = [(await create(client, admin, name=f"{tag} {i}"))["id"] for i in range(23)]
        first = await client.get(ITEMS, params={"q": tag})
        assert first.status_code == 200
        page = first.json()
        assert set(page) == {"items", "next_cursor"}
        assert len(page["items"]) == 20
        assert all(set(i) == FIELDS for i in page["items"])
        assert isinstance(page["next_cursor"], str)
        rest = (await client.get(ITEMS, params={"q": tag, "cursor": page["next_cursor"]})).json()
        assert len(rest["items"]) == 3
        assert rest["next_cursor"] is None
        listed = [i["id"] for i in page["items"] + rest["items"]]
        assert listed == sorted(created, key=uuid.UUID)

    async def test_an_exact_last_page_has_no_cursor(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        tag = prefix("exact")
        for i in range(4):
            await create(client, admin, name=f"{tag} {i}")
        page = (await client.get(ITEMS, params={"q": tag, "limit": 4})).json()
        assert len(page["items"]) == 4
        assert page["next_cursor"] is None
        assert (await client.get(ITEMS, params={"q": prefix("nothing")})).json() == {
            "items": [], "next_cursor": None
        }

    @pytest.mark.parametrize("limit", [1, 100])
    async def test_limit_bounds_are_accepted(self, client: httpx.AsyncClient, limit: int) -> None:
        response = await client.get(ITEMS, params={"limit": limit})
        assert response.status_code == 200
        assert len(response.json()["items"]) <= limit

    @pytest.mark.parametrize("limit", ["0", "101", "-1", "ten", "1.5"])
    async def test_limit_out_of_range_is_422(self, client: httpx.AsyncClient, limit: str) -> None:
        error = assert_envelope(await client.get(ITEMS, params={"limit": limit}), 422, "validation_error")
        assert ["query", "limit"] in [e["loc"] for e in error["details"]["errors"]]

    async def test_pagination_survives_inserts_between_pages(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        tag = prefix("walk")
        initial = {(await create(client, admin, name=f"{tag} {i:03}"))["id"] for i in range(300)}
        seen: list[str] = []
        added: set[str] = set()
        cursor = None
        for _ in range(100):
            params = {"q": tag, "limit": 37, **({"cursor": cursor} if cursor else {})}
            response = await client.get(ITEMS, params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            seen += [i["id"] for i in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
            for j in range(3):  # concurrent writers keep adding items while we walk
                added.add((await create(client, admin, name=f"{tag} new {len(added)}-{j}"))["id"])
        assert cursor is None
        assert len(seen) == len(set(seen)), "an item was listed twice"
        assert initial <= set(seen), "an item that existed at the start was skipped"
        assert set(seen) <= initial | added
        assert [uuid.UUID(i) for i in seen] == sorted(uuid.UUID(i) for i in seen), "order is not by id"
        everything = await list_ids(client, q=tag, limit=100)
        assert [i for i in everything if i in initial] == [i for i in seen if i in initial]
        assert set(everything) == initial | added

    async def test_filters(self, client: httpx.AsyncClient, admin: dict[str, str]) -> None:
        tag = prefix("Filt")
        apple = (await create(client, admin, name=f"{tag} Apple", price=100, currency="EUR"))["id"]
        apricot = (await create(client, admin, name=f"{tag}  APRICOT", price=250, currency="USD"))["id"]
        banana = (await create(client, admin, name=f"{tag} banana", price=500, currency="EUR"))["id"]
        other = (await create(client, admin, name=f"x{tag} Apple", price=250, currency="EUR"))["id"]

        async def ids(**params: Any) -> set[str]:
            return set(await list_ids(client, **params))

        assert await ids(q=tag) == {apple, apricot, banana}
        assert await ids(q=tag.upper()) == {apple, apricot, banana}
        assert await ids(q=f"{tag.lower()} ap") == {apple, apricot}
        assert await ids(q=f"{tag} APP") == {apple}
        assert await ids(q=f"x{tag}") == {other}
        assert await ids(q=tag, min_price=250) == {apricot, banana}
        assert await ids(q=tag, max_price=250) == {apple, apricot}
        assert await ids(q=tag, min_price=250, max_price=250) == {apricot}
        assert await ids(q=tag, min_price=101, max_price=249) == set()
        assert await ids(q=tag, currency="EUR") == {apple, banana}
        assert await ids(q=tag, currency="usd") == {apricot}
        assert await ids(q=tag, currency="EUR", min_price=200) == {banana}
        assert await ids(q=tag, currency="EUR", min_price=0, max_price=PRICE_MAX, limit=1) == {apple, banana}

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"min_price": -1}, "min_price"),
            ({"max_price": "cheap"}, "max_price"),
            ({"currency": "ABC"}, "currency"),
            ({"q": ""}, "q"),
            ({"q": "q" * 201}, "q"),
        ],
    )
    async def test_invalid_filters_are_422(
        self, client: httpx.AsyncClient, params: dict[str, Any], field: str
    ) -> None:
        error = assert_envelope(await client.get(ITEMS, params=params), 422, "validation_error")
        assert ["query", field] in [e["loc"] for e in error["details"]["errors"]]

    async def test_min_price_above_max_price_is_422(self, client: httpx.AsyncClient) -> None:
        response = await client.get(ITEMS, params={"min_price": 10, "max_price": 9})
        assert_envelope(response, 422, "validation_error")


@pytest.fixture(scope="module")
async def listing(stack: Stack, admin: dict[str, str]) -> tuple[str, str]:
    """A name prefix with three items, and the cursor after the first of them."""
    tag = prefix("cursor")
    for i in range(3):
        await create(stack.client, admin, name=f"{tag} {i}", price=100 + i)
    page = (await stack.client.get(ITEMS, params={"q": tag, "limit": 1})).json()
    assert page["next_cursor"]
    return tag, page["next_cursor"]


class TestCursors:
    async def test_a_valid_cursor_continues(
        self, client: httpx.AsyncClient, listing: tuple[str, str]
    ) -> None:
        tag, cursor = listing
        response = await client.get(ITEMS, params={"q": tag, "limit": 1, "cursor": cursor})
        assert response.status_code == 200
        assert len(response.json()["items"]) == 1

    @staticmethod
    def _flip(cursor: str, at: int) -> str:
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        replacement = alphabet[(alphabet.index(cursor[at]) + 1) % len(alphabet)]
        return cursor[:at] + replacement + cursor[at + 1 :]

    @pytest.mark.parametrize(
        "tamper",
        [
            "garbage",
            "empty",
            "not base64",
            "non ascii",
            "truncated by 4",
            "truncated to 10",
            "first char flipped",
            "middle char flipped",
            "signed with another secret",
            "other query's cursor",
            "with a filter added",
            "with the filter removed",
        ],
    )
    async def test_a_bad_cursor_is_400(
        self, client: httpx.AsyncClient, listing: tuple[str, str], tamper: str
    ) -> None:
        tag, cursor = listing
        params: dict[str, Any] = {"q": tag, "limit": 1}
        foreign = CursorCodec("another-secret-" + "y" * 32).encode(
            {"id": str(uuid.UUID(int=0))}, {"q": tag, "min_price": None, "max_price": None, "currency": None}
        )
        bad = {
            "garbage": "garbage",
            "empty": "",
            "not base64": "!!!!$$$$****",
            "non ascii": "curs\u00e9r",
            "truncated by 4": cursor[:-4],
            "truncated to 10": cursor[:10],
            "first char flipped": self._flip(cursor, 0),
            "middle char flipped": self._flip(cursor, len(cursor) // 2),
            "signed with another secret": foreign,
        }.get(tamper, cursor)
        if tamper == "other query's cursor":
            params["q"] = tag + " 1"
        elif tamper == "with a filter added":
            params["min_price"] = 0
        elif tamper == "with the filter removed":
            del params["q"]
        assert bad != cursor or tamper.startswith(("other", "with"))
        response = await client.get(ITEMS, params={**params, "cursor": bad})
        assert_envelope(response, 400, "invalid_cursor")

    async def test_an_oversized_cursor_is_a_client_error(self, client: httpx.AsyncClient) -> None:
        response = await client.get(ITEMS, params={"cursor": "A" * 5000})
        assert response.status_code in (400, 422), response.text
        assert response.json()["error"]["code"] in ("invalid_cursor", "validation_error")


class TestCacheMetrics:
    async def test_a_miss_then_a_hit_are_counted(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        item = await create(client, admin)
        before = cache_counts((await client.get("/metrics")).text)
        assert (await get(client, item["id"])).status_code == 200  # miss: loaded and stored
        assert (await get(client, item["id"])).status_code == 200  # hit
        after = cache_counts((await client.get("/metrics")).text)
        assert after["miss"] - before.get("miss", 0) == 1
        assert after["hit"] - before.get("hit", 0) == 1
        assert after.get("error", 0) == before.get("error", 0)


INT64_MAX = 2**63 - 1


class TestHostileText:
    """Text the database cannot store (or that breaks a line) is a 422 at the edge (issue 15)."""

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("name", "nul\u0000inside"),
            ("name", "two\nlines"),
            ("name", "escape\u001b[31m"),
            ("name", "del\u007f"),
            ("name", "lone \ud800 surrogate"),
            ("description", "nul\u0000inside"),
            ("description", "bell\u0007"),
            ("description", "lone \udfff surrogate"),
            ("currency", "EU\u0000"),
        ],
    )
    async def test_control_characters_and_lone_surrogates_are_422(
        self, stack: Stack, admin: dict[str, str], field: str, value: str
    ) -> None:
        tag = prefix("hostile")
        # json.dumps escapes a lone surrogate as "\ud800": the raw JSON a hostile client sends.
        body = item_body(name=tag)
        body[field] = f"{tag} {value}" if field == "name" else value  # a name keeps the tag, to list by
        raw = json.dumps(body)
        headers = {**admin, "Content-Type": "application/json"}
        response = await stack.client.post(ITEMS, content=raw, headers=headers)
        error = assert_envelope(response, 422, "validation_error")
        assert ["body", field] in [e["loc"] for e in error["details"]["errors"]]
        assert await list_ids(stack.client, q=tag) == []  # nothing written

    async def test_a_description_may_hold_lines_and_tabs(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        item = await create(client, admin, description="first line\n\tindented\r\nlast")
        assert item["description"] == "first line\n\tindented\r\nlast"

    async def test_a_patch_with_a_nul_is_422_and_changes_nothing(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        item = await create(client, admin)
        for changes in ({"name": "a\u0000b"}, {"description": "\u0000"}, {"price": 1, "name": "x\ny"}):
            response = await client.patch(f"{ITEMS}/{item['id']}", json=changes, headers=admin)
            assert_envelope(response, 422, "validation_error")
        assert (await get(client, item["id"])).json() == item

    @pytest.mark.parametrize(
        ("param", "value"),
        [
            ("q", "nul\u0000"),
            ("q", "line\nbreak"),
            ("cursor", "abc\u0000def"),
            ("min_price", str(2**63)),
            ("max_price", str(2**64)),
            ("min_price", str(10**30)),
            ("max_price", "-1"),
            ("max_price", str(-(2**63) - 1)),
        ],
    )
    async def test_query_parameters_out_of_their_column_are_422(
        self, client: httpx.AsyncClient, param: str, value: str
    ) -> None:
        response = await client.get(ITEMS, params={param: value})
        error = assert_envelope(response, 422, "validation_error")
        assert ["query", param] in [e["loc"] for e in error["details"]["errors"]]

    async def test_the_largest_64_bit_price_bound_is_accepted(
        self, client: httpx.AsyncClient, admin: dict[str, str]
    ) -> None:
        tag = prefix("bound")
        item = await create(client, admin, name=tag, price=PRICE_MAX)
        assert await list_ids(client, q=tag, min_price=0, max_price=INT64_MAX) == [item["id"]]
        assert await list_ids(client, q=tag, min_price=INT64_MAX) == []


def _http_requests(metrics_text: str, handler: str, method: str, status: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "http_requests_total"
        and sample.labels == {"handler": handler, "method": method, "status": status}
    )


async def _item_rows(stack: Stack) -> int:
    async with stack.container.sessions()() as session:
        return int((await session.execute(select(func.count()).select_from(ItemRow))).scalar_one())


class TestBodyLimit:
    """A 100 MB body is refused with 413 without being read (ATRIUM_MAX_BODY_BYTES, default 1 MiB)."""

    CHUNK = 1 << 20  # 1 MiB
    CHUNKS = 100  # 100 MiB in all

    async def _post(self, stack: Stack, admin: dict[str, str], *, declared: bool
                    ) -> tuple[httpx.Response, int]:
        pulled = 0

        async def body() -> Any:
            nonlocal pulled
            yield b'{"name": "'
            for _ in range(self.CHUNKS):
                pulled += 1
                yield b"x" * self.CHUNK

        headers = {**admin, "Content-Type": "application/json"}
        if declared:
            headers["Content-Length"] = str(self.CHUNKS * self.CHUNK + 10)
        response = await stack.client.post(ITEMS, content=body(), headers=headers)
        return response, pulled

    async def test_a_declared_100_mb_body_is_refused_before_a_byte_is_read(
        self, stack: Stack, admin: dict[str, str]
    ) -> None:
        rows = await _item_rows(stack)
        before = (await stack.client.get("/metrics")).text

        response, pulled = await self._post(stack, admin, declared=True)

        error = assert_envelope(response, 413, "payload_too_large")
        assert stack.settings.max_body_bytes == 1_048_576  # the default
        assert error["details"] == {"limit_bytes": 1_048_576}
        assert pulled == 0
        assert response.headers["x-request-id"]
        assert response.headers["connection"] == "close"
        after = (await stack.client.get("/metrics")).text
        assert _http_requests(after, ITEMS, "POST", "413") == _http_requests(before, ITEMS, "POST", "413") + 1
        assert await _item_rows(stack) == rows

    async def test_a_chunked_100_mb_body_stops_being_read_past_the_limit(
        self, stack: Stack, admin: dict[str, str]
    ) -> None:
        rows = await _item_rows(stack)

        response, pulled = await self._post(stack, admin, declared=False)

        assert_envelope(response, 413, "payload_too_large")
        # The opening bytes and the first MiB pass the limit: 1 chunk of 100 pulled, the rest never.
        assert pulled == 1
        assert await _item_rows(stack) == rows
