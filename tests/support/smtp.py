"""A real SMTP server on 127.0.0.1 for tests, so the SMTP adapter is exercised over TCP.

``aiosmtpd``'s controller runs the server on its own thread and event loop; received mail is
parsed and kept in ``SmtpServer.messages``. Being a real listener, it also receives mail sent by
other processes (e.g. a worker under test) pointed at ``host``/``port``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage as MimeMessage
from email.policy import default as default_policy
from types import TracebackType
from typing import Any

from aiosmtpd.controller import Controller


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One mail as the server got it: envelope addresses plus the parsed headers and text body."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    to: str
    from_: str
    subject: str
    body: str
    raw: bytes


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (also handy as a "nothing listens here" port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _text_body(message: MimeMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    content = part.get_content() if part is not None else ""
    # On the wire lines end in CRLF; hand tests the text the sender wrote.
    return str(content).replace("\r\n", "\n")


class _StoringHandler:
    def __init__(self) -> None:
        self.messages: list[ReceivedMessage] = []
        self.lock = threading.Lock()

    # aiosmtpd calls hooks by their SMTP verb, hence the name.
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = bytes(envelope.content)
        parsed = message_from_bytes(raw, policy=default_policy)
        assert isinstance(parsed, MimeMessage)
        received = ReceivedMessage(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(str(rcpt) for rcpt in envelope.rcpt_tos),
            to=str(parsed.get("To", "")),
            from_=str(parsed.get("From", "")),
            subject=str(parsed.get("Subject", "")),
            body=_text_body(parsed),
            raw=raw,
        )
        with self.lock:
            self.messages.append(received)
        return "250 Message accepted for delivery"


class SmtpServer:
    """Start/stop a local SMTP server; also a context manager (``with SmtpServer() as smtp:``)."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or 0
        self._requested_port = port
        self._handler = _StoringHandler()
        self._controller: Controller | None = None

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A snapshot of every mail received so far, oldest first."""
        with self._handler.lock:
            return list(self._handler.messages)

    def clear(self) -> None:
        with self._handler.lock:
            self._handler.messages.clear()

    def start(self) -> SmtpServer:
        if self._controller is not None:
            return self
        # The controller probes its own port once started, so it needs a concrete one, not 0.
        self.port = self._requested_port or free_port(self.host)
        # A fixed server_hostname avoids a getfqdn() DNS lookup that can stall the start.
        controller = Controller(
            self._handler, hostname=self.host, port=self.port, server_hostname="localhost"
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> SmtpServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _find(self, to: str) -> ReceivedMessage | None:
        wanted = to.lower()
        for message in self.messages:
            if wanted in (rcpt.lower() for rcpt in message.rcpt_tos):
                return message
        return None

    async def wait_for(self, to: str, timeout: float = 15.0) -> ReceivedMessage:  # noqa: ASYNC109
        """The first mail whose envelope recipients include ``to``; polls every 50 ms."""
        deadline = time.monotonic() + timeout
        while (found := self._find(to)) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no email to {to!r} arrived within {timeout} s")
            await asyncio.sleep(0.05)
        return found

    def wait_for_sync(self, to: str, timeout: float = 15.0) -> ReceivedMessage:
        """Blocking variant of ``wait_for`` for synchronous tests."""
        deadline = time.monotonic() + timeout
        while (found := self._find(to)) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no email to {to!r} arrived within {timeout} s")
            time.sleep(0.05)
        return found
