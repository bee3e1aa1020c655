"""The gateway for real, shared by its suites (tests/e2e/test_gateway.py,
tests/e2e/test_gateway_limits.py and others): the web process on the test database, the usage
row once written, and a raw HTTP request on a socket of its own. Their fixtures (`gateway`,
`warm_model`, `client`) are in tests/e2e/conftest.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from controlplane.gateway.models import Usage
from tests.e2e.agent_process import ROOT
from tests.e2e.fleet import database_url
from tests.support import free_port, http_ok, wait_for


def _takes_ctrl_c() -> None:
    """The web process hears SIGINT as a terminal's Ctrl-C sends it, however this test run was
    started: a shell's background job ignores SIGINT, its children inherit that, and daphne
    (Twisted) then leaves it ignored, as any program started so would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def web_process(
    settings, tmp_path, server: str = "uvicorn", **extra_env: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """The web process on the test database, with the rows the tests create: what `make run`
    serves (`python -m controlplane.web`), or the same application under daphne."""
    if settings.REDIS_URL:  # the tests' own Redis database: no rate counters of earlier runs
        redis.Redis.from_url(settings.REDIS_URL).flushdb()
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(),
        AGENT_TOKEN=settings.AGENT_TOKEN, SECRET_KEY="gateway-test", VAR_DIR=str(tmp_path / "var"),
        AGENT_CREDENTIAL_KEY=settings.AGENT_CREDENTIAL_KEY,
        **({} if settings.REDIS_URL else {"ALLOW_WITHOUT_REDIS": "true"}),
        GATEWAY_CACHE_SECONDS="0", **extra_env,
    )  # fmt: skip
    port = free_port()
    log = (tmp_path / "web.log").open("wb")
    argv = (
        ["-m", "controlplane.web", "--host", "127.0.0.1", "--port", str(port)]
        if server == "uvicorn"
        else ["-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "controlplane.asgi:application"]
    )
    web = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=_takes_ctrl_c,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    try:
        wait_for(lambda: http_ok(f"{url}/healthz"), 30, server)
        yield url, web
    finally:
        web.terminate()
        web.wait(timeout=30)


def usage_of(requests: int) -> Usage:
    """The one usage row, once it counts `requests` (the gateway writes it in batches)."""

    def recorded() -> bool:
        usage = Usage.objects.first()
        return usage is not None and usage.requests == requests

    wait_for(recorded, 10, "the usage records")
    return Usage.objects.get()


def raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send `head` (and `body`) on a socket of its own; what the server answered before closing."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(head)
        if body:
            with contextlib.suppress(OSError):  # it may close while the body is on its way
                sock.sendall(body)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer
