"""The outgoing-email port, so features say "send this mail" without knowing how it travels.

Development prints mail to the log, tests capture it in memory (and can wait for it, because mail
is usually sent from a background job), production talks SMTP. Transport failures of any kind
surface as ``EmailDeliveryError`` so callers (typically a retrying job) handle one exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import smtplib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage as MimeMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Protocol

from loguru import logger
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

# The global provider's tracer (a proxy until tracing is configured: core.observability.tracing).
_tracer = trace.get_tracer(__name__)


@dataclass(frozen=True, slots=True)
class EmailMessage:
    """One mail. ``key``: what makes it this mail and no other (``"users.welcome.<user id>"``): the
    same key gives the same Message-ID.

    A job that sends mail is at-least-once: a worker killed after the SMTP server accepted the mail
    but before the job's transaction committed gets the message again (docs/redelivery.md), and
    sends it again. Under a key the copy carries the first one's Message-ID, which says "the same
    message" to every mail system on the way (RFC 5322 3.6.4): mailbox providers and clients drop
    the copy, and a person can tell it for one. Without a key each send gets a new Message-ID.
    """

    to: str
    subject: str
    body: str
    key: str | None = None


def sender_domain(sender: str) -> str:
    """The domain of ``sender`` ("Atrium <no-reply@atrium.example>" -> "atrium.example"), for the
    Message-ID; "localhost" when it has none. Never the machine's name: looking that up can take
    seconds of DNS and says nothing a reader needs."""
    _name, address = parseaddr(sender)
    domain = address.rpartition("@")[2].strip()
    return domain if "@" in address and domain else "localhost"


def mime_message(sender: str, message: EmailMessage, domain: str | None = None) -> MimeMessage:
    """The MIME mail for ``message``: From, To, Subject, a Date and a Message-ID (whose domain is
    ``domain``, else the sender's): unique, or derived from ``message.key`` (the same for every send
    of that mail). Without the last two, relays add their own or spam filters mark the mail down."""
    mime = MimeMessage()
    mime["From"] = sender
    mime["To"] = message.to
    mime["Subject"] = message.subject
    mime["Date"] = formatdate(usegmt=True)  # in UTC; formatdate() alone writes "-0000", "zone unknown"
    mime["Message-ID"] = message_id(message.key, domain or sender_domain(sender))
    mime.set_content(message.body)
    return mime


def message_id(key: str | None, domain: str) -> str:
    """``<unique@domain>``; with ``key``, ``<hash of key@domain>``: the key itself is not shown
    (it may name a user or a payment) and any key makes a valid msg-id."""
    if key is None:
        return make_msgid(domain=domain)
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:40]}@{domain}>"


class EmailSender(Protocol):
    async def send(self, message: EmailMessage) -> None: ...


class EmailDeliveryError(Exception):
    """The mail could not be handed over to the transport."""


class ConsoleEmailSender:
    """Development "delivery": the whole mail goes to the log."""

    def __init__(self, sender: str) -> None:
        self.sender = sender

    async def send(self, message: EmailMessage) -> None:
        # Values are format arguments, never the format string: braces in a body stay literal.
        logger.info(
            "email (console)\nFrom: {}\nTo: {}\nSubject: {}\n\n{}",
            self.sender,
            message.to,
            message.subject,
            message.body,
        )


class InMemoryEmailSender:
    """Keeps every sent mail in ``sent``; ``wait_for`` lets a test await mail sent elsewhere.

    Mail is often sent from a background job or from a test client's own event loop, so waiters
    are woken with ``call_soon_threadsafe`` on their own loop rather than through one shared,
    loop-bound ``asyncio.Condition``.
    """

    def __init__(self) -> None:
        self.sent: list[EmailMessage] = []
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    async def send(self, message: EmailMessage) -> None:
        self.sent.append(message)
        for loop, woken in list(self._waiters):
            with contextlib.suppress(RuntimeError):  # that waiter's loop is already closed
                loop.call_soon_threadsafe(woken.set)

    def _first_match(self, predicate: Callable[[EmailMessage], bool]) -> EmailMessage | None:
        return next((message for message in list(self.sent) if predicate(message)), None)

    async def wait_for(  # a test-facing helper: a default deadline beats asyncio.timeout noise
        self,
        predicate: Callable[[EmailMessage], bool],
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> EmailMessage:
        """Return the first sent mail matching ``predicate``, waiting up to ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            waiter = (loop, asyncio.Event())
            self._waiters.add(waiter)
            try:
                # Checked after registering, so a mail sent in between still wakes us.
                found = self._first_match(predicate)
                if found is not None:
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"no matching email was sent within {timeout} s")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await waiter[1].wait()
            finally:
                self._waiters.discard(waiter)


class SmtpEmailSender:
    """Delivers through an SMTP relay; the blocking ``smtplib`` session runs in a worker thread."""

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        timeout: float = 10.0,
        message_id_domain: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self._username = username
        self._password = password
        self._starttls = starttls
        self._timeout = timeout
        self._domain = message_id_domain  # None or "": the sender's domain

    def _mime(self, message: EmailMessage) -> MimeMessage:
        return mime_message(self.sender, message, self._domain)

    def _deliver(self, mime: MimeMessage) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self._timeout) as smtp:
            if self._starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self._username is not None:
                smtp.login(self._username, self._password or "")
            smtp.send_message(mime)

    async def send(self, message: EmailMessage) -> None:
        mime = self._mime(message)  # header problems are caller bugs: raise them as they are
        # Tracing on, a send inside a recorded trace (a job's) gets a CLIENT span. The check is the
        # OpenTelemetry API's (email may not import core.observability): while tracing is off no
        # span is ever recording, so the cost is one context lookup per mail.
        if not trace.get_current_span().is_recording():
            await self._send(message, mime)
            return
        attributes: dict[str, str | int] = {"server.address": self.host, "server.port": self.port,
                      "network.protocol.name": "smtp", "atrium.email.message_id": str(mime["Message-ID"])}
        # No recipient, subject or body on the span: they are personal data, and spans travel
        # further than logs. The Message-ID finds the mail in the relay's own logs.
        with _tracer.start_as_current_span("SMTP send", kind=SpanKind.CLIENT, attributes=attributes,
                                           record_exception=False, set_status_on_exception=False) as span:
            try:
                await self._send(message, mime)
            except EmailDeliveryError as exc:
                cause = exc.__cause__ or exc
                span.set_attribute("error.type", type(cause).__qualname__)
                span.set_status(StatusCode.ERROR)  # no description: the error's text names the recipient
                raise

    async def _send(self, message: EmailMessage, mime: MimeMessage) -> None:
        try:
            await asyncio.to_thread(self._deliver, mime)
        except (smtplib.SMTPException, OSError) as exc:
            raise EmailDeliveryError(
                f"could not send email to {message.to!r} via {self.host}:{self.port}: {exc}"
            ) from exc
