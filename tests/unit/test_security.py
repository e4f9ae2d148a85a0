"""Unit tests for core.security: argon2id password hashing, HS256 access tokens, refresh tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from core.security import AccessClaims, InvalidToken, PasswordHasher, Principal, RefreshTokens, TokenService

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
def claims() -> AccessClaims:
    return AccessClaims(user_id=uuid.uuid4(), session_id=uuid.uuid4())


def valid_claims(clock: FakeClock, **overrides: object) -> dict:
    now = int(clock().timestamp())
    claims = {
        "sub": str(uuid.uuid4()),
        "sid": str(uuid.uuid4()),
        "iss": "atrium",
        "iat": now,
        "exp": now + 900,
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
    def test_claims_are_subject_session_issuer_and_times_and_nothing_else(
        self, tokens: TokenService, claims: AccessClaims
    ) -> None:
        token = tokens.issue(claims)
        header = b64url_decode_json(token.split(".")[0])
        decoded = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
        assert header["alg"] == "HS256"
        now = int(T0.timestamp())
        assert decoded == {
            "sub": str(claims.user_id),
            "sid": str(claims.session_id),
            "iss": "atrium",
            "iat": now,
            "exp": now + 900,
        }

    def test_a_principal_role_is_never_written_into_the_token(self, tokens: TokenService) -> None:
        admin = Principal(user_id=uuid.uuid4(), is_admin=True, session_id=uuid.uuid4())
        decoded = jwt.decode(tokens.issue(admin), options={"verify_signature": False})
        assert "adm" not in decoded
        assert decoded["sid"] == str(admin.session_id)

    def test_a_principal_without_a_session_gets_a_fresh_session_id_each_time(
        self, tokens: TokenService
    ) -> None:
        who = Principal(user_id=uuid.uuid4(), is_admin=False)
        first = tokens.verify(tokens.issue(who))
        second = tokens.verify(tokens.issue(who))
        assert first.user_id == second.user_id == who.user_id
        assert first.session_id != second.session_id

    def test_ttl_is_exposed(self, tokens: TokenService) -> None:
        assert tokens.ttl_seconds == 900

    def test_empty_secret_is_refused(self) -> None:
        with pytest.raises(ValueError, match="secret"):
            TokenService("", ttl_seconds=60)


class TestTokenVerify:
    def test_roundtrip(self, tokens: TokenService, claims: AccessClaims) -> None:
        assert tokens.verify(tokens.issue(claims)) == claims

    def test_roundtrip_with_real_clock(self) -> None:
        service = TokenService(SECRET, ttl_seconds=60)
        who = AccessClaims(user_id=uuid.uuid4(), session_id=uuid.uuid4())
        assert service.verify(service.issue(who)) == who

    def test_a_remembered_token_still_expires(
        self, tokens: TokenService, clock: FakeClock, claims: AccessClaims
    ) -> None:
        token = tokens.issue(claims)
        assert tokens.verify(token) == claims  # now remembered
        clock.advance(900 + 6)
        with pytest.raises(InvalidToken, match="expired"):
            tokens.verify(token)

    def test_valid_until_expiry(self, tokens: TokenService, clock: FakeClock, claims: AccessClaims) -> None:
        token = tokens.issue(claims)
        clock.advance(899)
        assert tokens.verify(token) == claims

    def test_expired(self, tokens: TokenService, clock: FakeClock, claims: AccessClaims) -> None:
        token = tokens.issue(claims)
        clock.advance(900 + 6)  # past the 5 s leeway
        with pytest.raises(InvalidToken, match="expired"):
            tokens.verify(token)

    def test_issued_in_the_future(self, tokens: TokenService, clock: FakeClock, claims: AccessClaims) -> None:
        clock.advance(3600)
        token = tokens.issue(claims)
        clock.advance(-3600)
        with pytest.raises(InvalidToken, match="future"):
            tokens.verify(token)

    def test_tampered_payload(self, tokens: TokenService, claims: AccessClaims) -> None:
        header, payload, signature = tokens.issue(claims).split(".")
        middle = len(payload) // 2
        flipped = "A" if payload[middle] != "A" else "B"
        with pytest.raises(InvalidToken):
            tokens.verify(f"{header}.{payload[:middle]}{flipped}{payload[middle + 1 :]}.{signature}")

    def test_another_session_written_into_the_payload(
        self, tokens: TokenService, claims: AccessClaims
    ) -> None:
        header, payload, signature = tokens.issue(claims).split(".")
        decoded = b64url_decode_json(payload)
        decoded["sid"] = str(uuid.uuid4())
        with pytest.raises(InvalidToken):
            tokens.verify(f"{header}.{b64url_json(decoded)}.{signature}")

    def test_tampered_signature(self, tokens: TokenService, claims: AccessClaims) -> None:
        header, payload, signature = tokens.issue(claims).split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
        raw[0] ^= 0x01
        with pytest.raises(InvalidToken):
            tokens.verify(f"{header}.{payload}.{b64url(bytes(raw))}")

    @pytest.mark.parametrize("alg", ["none", "None", "NONE"])
    def test_alg_none_rejected(self, tokens: TokenService, clock: FakeClock, alg: str) -> None:
        header = b64url_json({"alg": alg, "typ": "JWT"})
        payload = b64url_json(valid_claims(clock))
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
        self, tokens: TokenService, clock: FakeClock, claims: AccessClaims
    ) -> None:
        other = TokenService(OTHER_SECRET, ttl_seconds=900, clock=clock)
        with pytest.raises(InvalidToken):
            tokens.verify(other.issue(claims))

    def test_wrong_issuer_rejected(
        self, tokens: TokenService, clock: FakeClock, claims: AccessClaims
    ) -> None:
        other = TokenService(SECRET, ttl_seconds=900, issuer="someone-else", clock=clock)
        with pytest.raises(InvalidToken):
            tokens.verify(other.issue(claims))

    def test_an_old_token_with_a_role_and_no_session_is_refused(
        self, tokens: TokenService, clock: FakeClock
    ) -> None:
        now = int(clock().timestamp())
        old = {"sub": str(uuid.uuid4()), "adm": True, "iss": "atrium", "iat": now, "nbf": now,
               "exp": now + 900, "jti": uuid.uuid4().hex, "typ": "access"}  # before sessions existed
        with pytest.raises(InvalidToken):
            tokens.verify(jwt.encode(old, SECRET, algorithm="HS256"))

    @pytest.mark.parametrize(
        "garbage",
        ["", "garbage", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9.!!!.sig", "\x00\xff", "Bearer x.y.z"],
    )
    def test_garbage_rejected(self, tokens: TokenService, garbage: str) -> None:
        with pytest.raises(InvalidToken):
            tokens.verify(garbage)

    @pytest.mark.parametrize("claim", ["exp", "sub", "sid", "iss", "iat"])
    def test_missing_claim_rejected(self, tokens: TokenService, clock: FakeClock, claim: str) -> None:
        claims = valid_claims(clock)
        del claims[claim]
        with pytest.raises(InvalidToken):
            tokens.verify(jwt.encode(claims, SECRET, algorithm="HS256"))

    @pytest.mark.parametrize(
        "override",
        [
            {"sub": "not-a-uuid"},
            {"sid": "not-a-uuid"},
            {"sid": 12345},
            {"exp": "tomorrow"},
            {"iat": True},
        ],
    )
    def test_wrong_claim_values_rejected(
        self, tokens: TokenService, clock: FakeClock, override: dict[str, object]
    ) -> None:
        token = jwt.encode(valid_claims(clock, **override), SECRET, algorithm="HS256")
        with pytest.raises(InvalidToken):
            tokens.verify(token)


@pytest.fixture
def refresh() -> RefreshTokens:
    return RefreshTokens(SECRET, ttl_seconds=86_400)


class TestRefreshTokens:
    def test_roundtrip(self, refresh: RefreshTokens) -> None:
        session_id = uuid.uuid4()
        for generation in (0, 1, 2**32 - 1):
            assert refresh.read(refresh.issue(session_id, generation)) == (session_id, generation)

    def test_is_opaque_and_of_one_length(self, refresh: RefreshTokens) -> None:
        tokens = {refresh.issue(uuid.uuid4(), g) for g in range(50)}
        assert {len(t) for t in tokens} == {74}
        assert all(t.startswith("rt1.") and "." not in t[4:] for t in tokens)  # not a JWT

    def test_each_generation_is_another_token(self, refresh: RefreshTokens) -> None:
        session_id = uuid.uuid4()
        assert len({refresh.issue(session_id, g) for g in range(10)}) == 10

    def test_every_changed_character_is_refused(self, refresh: RefreshTokens) -> None:
        token = refresh.issue(uuid.uuid4(), 3)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        for i in range(4, len(token) - 1):  # the last character also carries 2 unused bits
            changed = token[:i] + alphabet[(alphabet.index(token[i]) + 1) % 64] + token[i + 1:]
            with pytest.raises(InvalidToken):
                refresh.read(changed)

    def test_a_later_generation_cannot_be_made_without_the_key(self, refresh: RefreshTokens) -> None:
        session_id = uuid.uuid4()
        raw = bytearray(base64.urlsafe_b64decode(refresh.issue(session_id, 1)[4:] + "=="))
        raw[19] = 2  # the generation's last byte; the MAC is left as it was
        with pytest.raises(InvalidToken, match="signature"):
            refresh.read("rt1." + b64url(bytes(raw)))

    def test_another_secret_refuses_it(self, refresh: RefreshTokens) -> None:
        other = RefreshTokens(OTHER_SECRET, ttl_seconds=60)
        with pytest.raises(InvalidToken):
            other.read(refresh.issue(uuid.uuid4(), 0))

    def test_the_key_is_not_the_secret_itself(self, refresh: RefreshTokens) -> None:
        # A MAC made with the raw secret (as a JWT signature is) is not a refresh token's.
        payload = uuid.uuid4().bytes + (0).to_bytes(4, "big")
        mac = hmac.new(SECRET.encode(), payload, hashlib.sha256).digest()
        with pytest.raises(InvalidToken):
            refresh.read("rt1." + b64url(payload + mac))

    @pytest.mark.parametrize(
        "garbage",
        ["", "rt1.", "rt1." + "A" * 70, "rt2." + "A" * 70, "rt1." + "é" * 70, "rt1." + "A" * 69 + "\x00",
         "eyJhbGciOiJIUzI1NiJ9.e30.sig", "rt1." + "!" * 70],
    )
    def test_garbage_is_refused(self, refresh: RefreshTokens, garbage: str) -> None:
        with pytest.raises(InvalidToken):
            refresh.read(garbage)

    def test_a_generation_out_of_range_is_a_bug(self, refresh: RefreshTokens) -> None:
        with pytest.raises(ValueError, match="generation"):
            refresh.issue(uuid.uuid4(), 2**32)
        with pytest.raises(ValueError, match="generation"):
            refresh.issue(uuid.uuid4(), -1)

    def test_bad_construction_is_refused(self) -> None:
        with pytest.raises(ValueError, match="secret"):
            RefreshTokens("", ttl_seconds=60)
        with pytest.raises(ValueError, match="ttl"):
            RefreshTokens(SECRET, ttl_seconds=0)
