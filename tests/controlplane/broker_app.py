"""A Celery app on the embedded broker for tests/controlplane/test_broker.py: one task that
writes down each message it gets, in a file per worker process."""

from __future__ import annotations

import os
from pathlib import Path

from celery import Celery

from controlplane import broker

BROKER_DIR = Path(os.environ["BROKER_TEST_DIR"])
SCHEME = os.environ.get("BROKER_TEST_SCHEME", broker.SCHEME)

app = Celery("brokertest", broker=f"{SCHEME}://localhost/")
app.conf.update(
    broker_transport_options=broker.transport_options(BROKER_DIR),
    task_acks_late=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
for folder in ("queue", "control"):
    (BROKER_DIR / folder).mkdir(parents=True, exist_ok=True)


@app.task(name="record")
def record(message_id: str) -> None:
    with (BROKER_DIR / f"received-{os.getpid()}").open("a") as out:
        out.write(message_id + "\n")
