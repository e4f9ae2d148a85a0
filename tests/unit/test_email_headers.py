"""Every mail the SMTP sender builds carries a Date and a Message-ID (core/email.py): unique, or the
same for every send of a mail with the same key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import pytest

from containers import build_container
from core.email import EmailMessage, SmtpEmailSender, mime_message, sender_domain
from tests.support.settings import make_settings

MAIL = EmailMessage(to="ada@example.com", subject="Welcome", body="Hello {name}")


class TestMimeMessage:
    def test_has_a_message_id_in_the_senders_domain(self) -> None:
        mime = mime_message("Atrium <no-reply@mail.atrium.example>", MAIL)

        message_id = mime["Message-ID"]
        assert message_id.startswith("<")
        assert message_id.endswith("@mail.atrium.example>")

    def test_message_ids_are_unique(self) -> None:
        ids = {mime_message("no-reply@atrium.example", MAIL)["Message-ID"] for _ in range(100)}

        assert len(ids) == 100

    def test_a_mail_sent_again_under_its_key_has_the_same_message_id(self) -> None:
        keyed = EmailMessage(to="ada@example.com", subject="Welcome", body="Hi", key="users.welcome.42")
        first = mime_message("no-reply@atrium.example", keyed)["Message-ID"]
        again = mime_message("no-reply@atrium.example", keyed)["Message-ID"]
        other = mime_message("no-reply@atrium.example",
                             EmailMessage(to="ada@example.com", subject="Welcome", body="Hi",
                                          key="users.welcome.43"))["Message-ID"]

        assert first == again
        assert other != first
        assert first.endswith("@atrium.example>")
        assert "users.welcome" not in first  # the key (it may name a user) is not shown
        assert len(first) == len("<") + 40 + len("@atrium.example>")

    def test_a_given_domain_wins_over_the_senders(self) -> None:
        mime = mime_message("no-reply@atrium.example", MAIL, domain="relay.example")

        assert mime["Message-ID"].endswith("@relay.example>")

    def test_has_a_date_of_now(self) -> None:
        mime = mime_message("no-reply@atrium.example", MAIL)

        sent = parsedate_to_datetime(mime["Date"])
        assert sent.tzinfo is not None
        assert abs(datetime.now(UTC) - sent) < timedelta(minutes=1)

    def test_keeps_the_other_headers_and_the_body(self) -> None:
        mime = mime_message("Atrium <no-reply@atrium.example>", MAIL)

        assert mime["From"] == "Atrium <no-reply@atrium.example>"
        assert mime["To"] == "ada@example.com"
        assert mime["Subject"] == "Welcome"
        assert mime.get_content().strip() == "Hello {name}"
        assert len(mime.get_all("Message-ID") or []) == 1
        assert len(mime.get_all("Date") or []) == 1


class TestSmtpSender:
    def test_builds_its_mail_with_both_headers(self) -> None:
        sender = SmtpEmailSender("smtp.example", 25, "Atrium <no-reply@atrium.example>")

        mime = sender._mime(MAIL)

        assert mime["Message-ID"].endswith("@atrium.example>")
        assert mime["Date"]

    def test_a_configured_domain_is_used(self) -> None:
        sender = SmtpEmailSender("smtp.example", 25, "no-reply@atrium.example",
                                 message_id_domain="ids.atrium.example")

        assert sender._mime(MAIL)["Message-ID"].endswith("@ids.atrium.example>")


class TestMessageIdDomainSetting:
    def _sender(self, **settings: str) -> SmtpEmailSender:
        container = build_container(make_settings(email_backend="smtp", smtp_host="smtp.example",
                                                     email_from="no-reply@atrium.example", **settings))
        sender = container.email_sender()
        assert isinstance(sender, SmtpEmailSender)
        return sender

    def test_the_setting_reaches_the_smtp_sender(self) -> None:
        sender = self._sender(email_message_id_domain="Mail.Atrium.Example")

        assert sender._mime(MAIL)["Message-ID"].endswith("@mail.atrium.example>")

    def test_unset_it_is_the_senders_domain(self) -> None:
        assert self._sender()._mime(MAIL)["Message-ID"].endswith("@atrium.example>")


@pytest.mark.parametrize(("sender", "domain"), [
    ("Atrium <no-reply@atrium.example>", "atrium.example"),
    ("no-reply@atrium.example", "atrium.example"),
    ("Atrium", "localhost"),  # no address: never the machine's name (a DNS lookup)
    ("", "localhost"),
])
def test_sender_domain(sender: str, domain: str) -> None:
    assert sender_domain(sender) == domain
