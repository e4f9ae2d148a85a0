"""A local SMTP sink for the scale-out setup: accepts every mail and appends one JSON line per mail.

    python deploy/smtp_sink.py --port 8025 --out var/scale-out/mail.jsonl

Each line holds ``time``, ``mail_from``, ``rcpt_tos``, ``to``, ``subject``, ``message_id`` and
``size``, so a script or a test can count what was delivered (a welcome mail per sign-up, a
receipt per payment) from another process. Runs in the foreground until SIGTERM or Ctrl-C.
Needs ``aiosmtpd`` (in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from email import message_from_bytes
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


class JsonLinesHandler:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.count = 0

    # aiosmtpd calls hooks by their SMTP verb, hence the name.
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = bytes(envelope.content)
        parsed = message_from_bytes(raw, policy=default_policy)
        record = {
            "time": time.time(),
            "mail_from": str(envelope.mail_from),
            "rcpt_tos": [str(rcpt) for rcpt in envelope.rcpt_tos],
            "to": str(parsed.get("To", "")),
            "subject": str(parsed.get("Subject", "")),
            "message_id": str(parsed.get("Message-ID", "")),
            "size": len(raw),
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.lock, self.out.open("a", encoding="utf-8") as file:
            file.write(line)
            self.count += 1
        return "250 Message accepted for delivery"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SMTP sink writing one JSON line per received mail.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--out", type=Path, required=True, help="the JSON-lines file to append to")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.touch()
    handler = JsonLinesHandler(args.out)
    # A fixed server_hostname avoids a getfqdn() DNS lookup that can stall the start.
    controller = Controller(handler, hostname=args.host, port=args.port, server_hostname="localhost")
    controller.start()
    print(f"smtp sink listening on {args.host}:{args.port}, writing {args.out}", flush=True)
    try:
        stop.wait()
    finally:
        controller.stop()
        print(f"smtp sink stopped after {handler.count} mail(s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
