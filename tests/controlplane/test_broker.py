"""The embedded broker (controlplane.broker): many producers and both consumers for a minute
lose nothing and crash nothing; a message that does not decode is set aside, not fatal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kombu import Connection

from controlplane import broker
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_a_message_that_does_not_decode_is_set_aside_and_the_next_one_served(tmp_path):
    options = broker.transport_options(tmp_path)
    queue = Path(options["data_folder_in"])
    queue.mkdir(parents=True)
    # Older than any message a producer names now (names sort as text; "0_" comes first).
    (queue / "0_a_garbage.control.msg").write_bytes(b"this is {not json")
    (queue / "0_b_empty.control.msg").write_bytes(b"")  # what kombu's half-written file read as
    with Connection(f"{broker.SCHEME}://localhost/", transport_options=options) as connection:
        channel = connection.default_channel
        channel._put("control", {"body": "whole", "headers": {}, "properties": {}})
        assert channel._get("control")["body"] == "whole"
    dropped = sorted(path.name for path in (tmp_path / broker.DROPPED).iterdir())
    assert dropped == ["0_a_garbage.control.msg", "0_b_empty.control.msg"]
    assert list(queue.glob("*.msg")) == []


PRODUCER = """
import os, sys, time
sys.path.insert(0, {root!r})
from tests.controlplane.broker_app import app
tag, seconds, rate = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
sent, started = 0, time.monotonic()
with open(os.path.join(os.environ["BROKER_TEST_DIR"], "sent-" + tag), "w") as log:
    while time.monotonic() - started < seconds:
        message_id = f"{{tag}}-{{sent}}"
        app.send_task("record", args=[message_id], queue=("control", "loads")[sent % 2])
        log.write(message_id + "\\n")
        log.flush()
        sent += 1
        time.sleep(1 / rate)
"""


def lines(directory: Path, prefix: str) -> list[str]:
    return [line for path in directory.glob(f"{prefix}*") for line in path.read_text().splitlines()]


@pytest.mark.e2e
def test_many_producers_and_both_consumers_for_a_minute_lose_nothing(tmp_path):
    """kombu's own transport lost this race (a consumer read a message file before its
    producer wrote it: JSONDecodeError, and the worker stopped); here every message sent is
    received, and a malformed one sent midway stops nothing."""
    seconds = float(os.environ.get("BROKER_TEST_SECONDS", "60"))
    env = {**os.environ, "BROKER_TEST_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    celery = [sys.executable, "-m", "celery", "-A", "tests.controlplane.broker_app", "worker",
              "--pool", "threads", "--concurrency", "4", "--loglevel", "INFO"]  # fmt: skip
    workers = {
        queue: subprocess.Popen(
            [*celery, "--queues", queue, "--hostname", f"{queue}@%h"],
            cwd=ROOT,
            env=env,
            stdout=(tmp_path / f"{queue}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for queue in ("control", "loads")
    }
    try:
        for queue in workers:
            wait_for(lambda q=queue: "ready." in (tmp_path / f"{q}.log").read_text(), 60, queue)
        producers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    PRODUCER.format(root=str(ROOT)),
                    f"p{n}",
                    str(seconds),
                    "40",
                ],
                cwd=ROOT,
                env=env,
            )
            for n in range(6)
        ]
        time.sleep(seconds / 2)
        queue = tmp_path / "queue"
        (queue / f"{round(time.monotonic() * 1000)}_bad.control.msg").write_bytes(b"{not json")
        for producer in producers:
            assert producer.wait(timeout=seconds + 60) == 0
        sent = set(lines(tmp_path, "sent-"))
        assert len(sent) > 1000
        wait_for(lambda: set(lines(tmp_path, "received-")) >= sent, 120, "every message")
        for name, worker in workers.items():
            assert worker.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            assert "Unrecoverable" not in (tmp_path / f"{name}.log").read_text()
        received = lines(tmp_path, "received-")
        assert len(received) == len(sent)  # each once
        assert len(list((tmp_path / broker.DROPPED).iterdir())) == 1
    finally:
        for worker in workers.values():
            worker.send_signal(signal.SIGTERM)
        for worker in workers.values():
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
