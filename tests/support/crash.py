"""What the crash tests (a real ``atrium worker`` SIGKILLed) read and clean up."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.services import RABBITMQ_URL


def redelivered(port: int) -> dict[str, float]:
    """``atrium_jobs_redelivered_total`` per task, from a worker's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {s.labels["task"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "atrium_jobs_redelivered_total"}


def delete_rabbitmq_queues(namespace: str) -> None:
    """The durable queues a test's namespace declared (its name is unique: nothing else uses them)."""
    import pika
    import pika.exceptions

    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        for module in ("users", "items", "billing"):
            for suffix in ("", ".DQ", ".XQ"):
                channel = connection.channel()
                try:
                    channel.queue_delete(f"{namespace}.{module}{suffix}")
                    channel.close()
                except pika.exceptions.AMQPError:
                    pass
    finally:
        connection.close()
