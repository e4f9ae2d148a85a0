"""Unit tests for core.security: argon2id password hashing and HS256 access tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from core.security import InvalidToken, PasswordHasher, Principal, TokenService

SECRET = "unit-test-secret-that-is-long-enough-for-hs256-and-even-for-hs512!!"
OTHER_SECRET = "another-secret-that-is-also-long-enough-for-hs256"
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(obj: dict) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def b64url_decode_json(segment: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


@pytest.fixture
def hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tokens(clock: FakeClock) -> TokenService:
    return TokenService(SECRET, ttl_seconds=900, clock=clock)


@pytest.fixture
def principal() -> Principal:
    return Principal(user_id=uuid.uuid4(), is_admin=False)


def valid_claims(clock: FakeClock, **overrides: object) -> dict:
    now = int(clock().timestamp())
    claims = {
        "sub": str(uuid.uuid4()),
        "adm": False,
        "iss": "atrium",
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
        "typ": "access",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


class TestHash:
    def test_is_argon2id(self, hasher: PasswordHasher) -> None:
        assert hasher.hash("correct horse").startswith("$argon2id$")

    def test_uses_the_given_parameters(self, hasher: PasswordHasher) -> None:
        assert "$m=8,t=1,p=1$" in hasher.hash("x")

    def test_salts_every_hash(self, hasher: PasswordHasher) -> None:
        assert hasher.hash("same") != hasher.hash("same")

    def test_defaults_are_argon2_cffi_defaults(self) -> None:
        default = PasswordHasher()
        assert (default.time_cost, default.memory_cost, default.parallelism) == (3, 65536, 4)


class TestVerify:
    def test_roundtrip(self, hasher: PasswordHasher) -> None:
        assert hasher.verify(hasher.hash("s3cret pässword"), "s3cret pässword") is True

    def test_wrong_password_is_false(self, hasher: PasswordHasher) -> None:
        assert hasher.verify(hasher.hash("right"), "wrong") is False

    @pytest.mark.parametrize("garbage", ["", "not-a-hash", "$argon2id$v=19$m=8,t=1,p=1$broken", "$2b$12$abc"])
    def test_garbage_hash_is_false(self, hasher: PasswordHasher, garbage: str) -> None:
        assert hasher.verify(garbage, "whatever") is False

    def test_verifies_hash_made_with_other_parameters(self, hasher: PasswordHasher) -> None:
        other = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
        assert hasher.verify(other.hash("pw"), "pw") is True


class TestNeedsRehash:
    def test_same_parameters_need_no_rehash(self, hasher: PasswordHasher) -> None:
        assert hasher.needs_rehash(hasher.hash("pw")) is False

    def test_other_parameters_need_rehash(self, hasher: PasswordHasher) -> None:
        other = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
        assert hasher.needs_rehash(other.hash("pw")) is True

    def test_garbage_needs_rehash(self, hasher: PasswordHasher) -> None:
        assert hasher.needs_rehash("garbage") is True


class TestHashAsync:
    async def test_roundtrip_through_thread(self, hasher: PasswordHasher) -> None:
        hashed = await hasher.hash_async("async pw")
        assert hashed.startswith("$argon2id$")
        assert hasher.verify(hashed, "async pw") is True


class TestVerifyAsync:
    async def test_match(self, hasher: PasswordHasher) -> None:
        assert await hasher.verify_async(hasher.hash("pw"), "pw") is True

    async def test_mismatch(self, hasher: PasswordHasher) -> None:
        assert await hasher.verify_async(hasher.hash("pw"), "nope") is False

    async def test_garbage(self, hasher: PasswordHasher) -> None:
        assert await hasher.verify_async("garbage", "pw") is False


class TestVerifyDummy:
    async def test_runs_and_returns_none(self, hasher: PasswordHasher) -> None:
        assert await hasher.verify_dummy("anything") is None

    async def test_dummy_hash_is_computed_once(
        self, hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        calls: list[str] = []
        real_hash = hasher.hash

        def counting_hash(password: str) -> str:
            calls.append(password)
            return real_hash(password)

        monkeypatch.setattr(hasher, "hash", counting_hash)
        await hasher.verify_dummy("a")
        await hasher.verify_dummy("b")
        assert len(calls) == 1


class TestIssue:
    def test_claims(self, tokens: TokenService, principal: Principal) -> None:
        token = tokens.issue(principal)
        header = b64url_decode_json(token.split(".")[0])
        claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
        assert header["alg"] == "HS256"
        now = int(T0.timestamp())
        assert claims["sub"] == str(principal.user_id)
        assert claims["adm"] is False
        assert claims["iss"] == "atrium"
        assert claims["typ"] == "access"
        assert claims["iat"] == claims["nbf"] == now
        assert claims["exp"] == now + 900
        assert len(claims["jti"]) == 32
        uuid.UUID(hex=claims["jti"])

    def test_unique_jti(self, tokens: TokenService, principal: Principal) -> None:
        first = jwt.decode(tokens.issue(principal), options={"verify_signature": False})
        second = jwt.decode(tokens.issue(principal), options={"verify_signature": False})
        assert first["jti"] != second["jti"]

    def test_ttl_is_exposed(self, tokens: TokenService) -> None:
        assert tokens.ttl_seconds == 900

    def test_empty_secret_is_refused(self) -> None:
        with pytest.raises(ValueError, match="secret"):
            TokenService("", ttl_seconds=60)


class TestTokenVerify:
    def test_roundtrip(self, tokens: TokenService) -> None:
        admin = Principal(user_id=uuid.uuid4(), is_admin=True)
        assert tokens.verify(tokens.issue(admin)) == admin

    def test_roundtrip_with_real_clock(self) -> None:
        service = TokenService(SECRET, ttl_seconds=60)
        who = Principal(user_id=uuid.uuid4(), is_admin=False)
        assert service.verify(service.issue(who)) == who

    def test_valid_until_expiry(self, tokens: TokenService, clock: FakeClock, principal: Principal) -> None:
        token = tokens.issue(principal)
        clock.advance(899)
        assert tokens.verify(token) == principal

    def test_expired(self, tokens: TokenService, clock: FakeClock, principal: Principal) -> None:
        token = tokens.issue(principal)
        clock.advance(900 + 6)  # past the 5 s leeway
        with pytest.raises(InvalidToken, match="expired"):
            tokens.verify(token)

    def test_not_yet_valid(self, tokens: TokenService, clock: FakeClock, principal: Principal) -> None:
        clock.advance(3600)
        token = tokens.issue(principal)
        clock.advance(-3600)
        with pytest.raises(InvalidToken):
            tokens.verify(token)

    def test_tampered_payload(self, tokens: TokenService, principal: Principal) -> None:
        header, payload, signature = tokens.issue(principal).split(".")
        middle = len(payload) // 2
        flipped = "A" if payload[middle] != "A" else "B"
        with pytest.raises(InvalidToken):
            tokens.verify(f"{header}.{payload[:middle]}{flipped}{payload[middle + 1 :]}.{signature}")

    def test_privilege_escalation_in_payload(self, tokens: TokenService, principal: Principal) -> None:
        header, payload, signature = tokens.issue(principal).split(".")
        claims = b64url_decode_json(payload)
        claims["adm"] = True
        with pytest.raises(InvalidToken):
            tokens.verify(f"{header}.{b64url_json(claims)}.{signature}")

    def test_tampered_signature(self, tokens: TokenService, principal: Principal) -> None:
        header, payload, signature = tokens.issue(principal).split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
        raw[0] ^= 0x01
        with pytest.raises(InvalidToken):
            tokens.verify(f"{header}.{payload}.{b64url(bytes(raw))}")

    @pytest.mark.parametrize("alg", ["none", "None", "NONE"])
    def test_alg_none_rejected(self, tokens: TokenService, clock: FakeClock, alg: str) -> None:
        header = b64url_json({"alg": alg, "typ": "JWT"})
        payload = b64url_json(valid_claims(clock, adm=True))
        with pytest.raises(InvalidToken):
            tokens.verify(f"{header}.{payload}.")

    def test_hs512_with_same_secret_rejected(self, tokens: TokenService, clock: FakeClock) -> None:
        token = jwt.encode(valid_claims(clock), SECRET, algorithm="HS512")
        with pytest.raises(InvalidToken):
            tokens.verify(token)

    def test_header_claiming_rs256_rejected(self, tokens: TokenService, clock: FakeClock) -> None:
        # Key confusion: an HMAC signature made with the secret under an "RS256" header.
        signing_input = f"{b64url_json({'alg': 'RS256', 'typ': 'JWT'})}.{b64url_json(valid_claims(clock))}"
        signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        with pytest.raises(InvalidToken):
            tokens.verify(f"{signing_input}.{b64url(signature)}")

    def test_other_secret_rejected(
        self, tokens: TokenService, clock: FakeClock, principal: Principal
    ) -> None:
        other = TokenService(OTHER_SECRET, ttl_seconds=900, clock=clock)
        with pytest.raises(InvalidToken):
            tokens.verify(other.issue(principal))

    def test_wrong_issuer_rejected(
        self, tokens: TokenService, clock: FakeClock, principal: Principal
    ) -> None:
        other = TokenService(SECRET, ttl_seconds=900, issuer="someone-else", clock=clock)
        with pytest.raises(InvalidToken):
            tokens.verify(other.issue(principal))

    @pytest.mark.parametrize(
        "garbage",
        ["", "garbage", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9.!!!.sig", "\x00\xff", "Bearer x.y.z"],
    )
    def test_garbage_rejected(self, tokens: TokenService, garbage: str) -> None:
        with pytest.raises(InvalidToken):
            tokens.verify(garbage)

    @pytest.mark.parametrize("claim", ["exp", "sub", "adm", "iss", "iat", "nbf", "jti", "typ"])
    def test_missing_claim_rejected(self, tokens: TokenService, clock: FakeClock, claim: str) -> None:
        claims = valid_claims(clock)
        del claims[claim]
        with pytest.raises(InvalidToken):
            tokens.verify(jwt.encode(claims, SECRET, algorithm="HS256"))

    @pytest.mark.parametrize(
        "override",
        [
            {"typ": "refresh"},
            {"sub": "not-a-uuid"},
            {"adm": "yes"},
            {"exp": "tomorrow"},
            {"jti": ""},
        ],
    )
    def test_wrong_claim_values_rejected(
        self, tokens: TokenService, clock: FakeClock, override: dict[str, object]
    ) -> None:
        token = jwt.encode(valid_claims(clock, **override), SECRET, algorithm="HS256")
        with pytest.raises(InvalidToken):
            tokens.verify(token)
