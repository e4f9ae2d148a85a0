"""One contract for every ``EmailSender``: what was sent is what the recipient gets.

"Gets" means ``InMemoryEmailSender.sent`` for the in-memory adapter and, for SMTP, what a real
local SMTP server (``tests.support.smtp``) received over TCP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
from loguru import logger

from core.email import (
    ConsoleEmailSender,
    EmailDeliveryError,
    EmailMessage,
    EmailSender,
    InMemoryEmailSender,
    SmtpEmailSender,
)
from tests.support.smtp import SmtpServer, free_port

SENDER = "Atrium <no-reply@atrium.test>"


@dataclass
class Outbox:
    """An adapter under test plus a way to read what reached a recipient."""

    sender: EmailSender
    received: Callable[[str], Awaitable[EmailMessage]]


@pytest.fixture(scope="module")
def smtp_server() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


@pytest.fixture(params=["memory", "smtp"])
def outbox(request: pytest.FixtureRequest) -> Outbox:
    if request.param == "memory":
        memory = InMemoryEmailSender()

        async def from_memory(to: str) -> EmailMessage:
            return await memory.wait_for(lambda message: message.to == to, timeout=2.0)

        return Outbox(memory, from_memory)

    server: SmtpServer = request.getfixturevalue("smtp_server")
    smtp = SmtpEmailSender(server.host, server.port, sender=SENDER, timeout=5.0)

    async def from_server(to: str) -> EmailMessage:
        got = await server.wait_for(to, timeout=5.0)
        # MIME text always ends in a newline; the sender's body did not.
        return EmailMessage(to=got.to, subject=got.subject, body=got.body.removesuffix("\n"))

    return Outbox(smtp, from_server)


def _unique(local: str) -> str:
    # Tests share one module-scoped SMTP server, so each uses its own recipient.
    return f"{local}-{time.monotonic_ns()}@example.test"


class TestSend:
    async def test_delivers_to_the_recipient_with_subject_and_body(self, outbox: Outbox) -> None:
        to = _unique("ada")
        await outbox.sender.send(EmailMessage(to=to, subject="Welcome to Atrium", body="Hello Ada."))
        assert await outbox.received(to) == EmailMessage(to, "Welcome to Atrium", "Hello Ada.")

    async def test_multi_line_unicode_and_dot_leading_bodies_survive(self, outbox: Outbox) -> None:
        to = _unique("grace")
        body = (
            "Line one\n"
            ".a line that starts with a dot (SMTP dot-stuffing)\n"
            "\n"
            "Unicode: h\u00e9llo \u2713 \u65e5\u672c\n" + "x" * 200 + "\n{braces} stay {literal}"
        )
        subject = "R\u00e9sum\u00e9 \u2013 your code: {42}"
        await outbox.sender.send(EmailMessage(to=to, subject=subject, body=body))
        assert await outbox.received(to) == EmailMessage(to, subject, body)

    async def test_each_mail_reaches_only_its_own_recipient(self, outbox: Outbox) -> None:
        first, second = _unique("first"), _unique("second")
        await outbox.sender.send(EmailMessage(to=first, subject="for first", body="1"))
        await outbox.sender.send(EmailMessage(to=second, subject="for second", body="2"))
        assert (await outbox.received(second)).subject == "for second"
        assert (await outbox.received(first)).subject == "for first"


class TestInMemoryEmailSender:
    async def test_keeps_sent_mail_in_order(self) -> None:
        sender = InMemoryEmailSender()
        one, two = EmailMessage("a@x.test", "1", "b1"), EmailMessage("b@x.test", "2", "b2")
        await sender.send(one)
        await sender.send(two)
        assert sender.sent == [one, two]

    async def test_wait_for_returns_an_already_sent_match(self) -> None:
        sender = InMemoryEmailSender()
        await sender.send(EmailMessage("a@x.test", "no", "-"))
        await sender.send(EmailMessage("b@x.test", "yes", "-"))
        found = await sender.wait_for(lambda m: m.to == "b@x.test", timeout=0.5)
        assert found.subject == "yes"

    async def test_wait_for_wakes_up_when_the_mail_is_sent_later(self) -> None:
        sender = InMemoryEmailSender()
        waiting = asyncio.create_task(sender.wait_for(lambda m: m.subject == "reset", timeout=5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await sender.send(EmailMessage("a@x.test", "other", "-"))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # a non-matching mail does not satisfy the waiter
        started = time.monotonic()
        await sender.send(EmailMessage("a@x.test", "reset", "token"))
        found = await waiting
        assert found.body == "token"
        assert time.monotonic() - started < 0.5

    async def test_wait_for_sees_mail_sent_from_another_event_loop(self) -> None:
        sender = InMemoryEmailSender()
        waiting = asyncio.create_task(sender.wait_for(lambda m: m.to == "t@x.test", timeout=5.0))
        await asyncio.sleep(0.05)
        other_loop = threading.Thread(
            target=asyncio.run, args=(sender.send(EmailMessage("t@x.test", "threaded", "-")),)
        )
        started = time.monotonic()
        other_loop.start()
        found = await waiting
        other_loop.join()
        assert found.subject == "threaded"
        assert time.monotonic() - started < 0.5  # woken by the send, not by the deadline

    async def test_wait_for_times_out_without_a_match(self) -> None:
        sender = InMemoryEmailSender()
        await sender.send(EmailMessage("a@x.test", "nope", "-"))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await sender.wait_for(lambda m: m.to == "b@x.test", timeout=0.2)
        assert 0.15 < time.monotonic() - started < 1.0


class TestSmtpEmailSender:
    async def test_uses_the_configured_sender_on_envelope_and_header(self, smtp_server: SmtpServer) -> None:
        to = _unique("envelope")
        sender = SmtpEmailSender(smtp_server.host, smtp_server.port, sender=SENDER)
        await sender.send(EmailMessage(to=to, subject="s", body="b"))
        got = await smtp_server.wait_for(to, timeout=5.0)
        assert got.mail_from == "no-reply@atrium.test"
        assert got.rcpt_tos == (to,)
        assert got.from_ == SENDER

    async def test_a_closed_port_raises_email_delivery_error(self) -> None:
        sender = SmtpEmailSender("127.0.0.1", free_port(), sender=SENDER, timeout=2.0)
        with pytest.raises(EmailDeliveryError) as caught:
            await sender.send(EmailMessage(to="a@x.test", subject="s", body="b"))
        assert isinstance(caught.value.__cause__, OSError)

    @pytest.mark.parametrize(
        "options",
        [{"starttls": True}, {"username": "user", "password": "secret"}],
        ids=["starttls", "login"],
    )
    async def test_a_server_lacking_a_required_extension_raises_email_delivery_error(
        self, smtp_server: SmtpServer, options: dict[str, object]
    ) -> None:
        # The test server offers neither STARTTLS nor AUTH, so the session must fail, not downgrade.
        to = _unique("refused")
        sender = SmtpEmailSender(smtp_server.host, smtp_server.port, sender=SENDER, **options)  # type: ignore[arg-type]
        with pytest.raises(EmailDeliveryError):
            await sender.send(EmailMessage(to=to, subject="s", body="b"))
        await asyncio.sleep(0.1)
        assert all(to not in message.rcpt_tos for message in smtp_server.messages)


class TestConsoleEmailSender:
    async def test_logs_the_whole_mail(self) -> None:
        records: list[str] = []
        sink_id = logger.add(records.append, format="{level}|{message}")
        try:
            await ConsoleEmailSender(SENDER).send(
                EmailMessage(to="ada@x.test", subject="Hi {name}", body="Line 1\nLine {2}")
            )
        finally:
            logger.remove(sink_id)
        assert len(records) == 1
        logged = records[0]
        assert logged.startswith("INFO|")
        for part in (SENDER, "ada@x.test", "Hi {name}", "Line 1\nLine {2}"):
            assert part in logged
