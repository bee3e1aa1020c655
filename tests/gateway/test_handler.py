"""The lean /v1 handler: Django's views and errors, no middleware, healthy connections."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from channels.testing import HttpCommunicator
from django.db import connection

from controlplane.asgi import application
from controlplane.gateway.handler import _drop_broken_connections
from tests.factories import ModelFactory, make_api_key

pytestmark = pytest.mark.django_db(transaction=True)


async def get(path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    return await HttpCommunicator(application, "GET", path, headers=headers).get_response()


async def test_v1_answers_through_the_lean_handler_without_middleware_headers():
    from asgiref.sync import sync_to_async

    await sync_to_async(ModelFactory)(model_id="org/m")
    _, raw_key = await sync_to_async(make_api_key)()
    ok = await get("/v1/models", [(b"authorization", f"Bearer {raw_key}".encode())])
    assert ok["status"] == 200
    assert [m["id"] for m in json.loads(ok["body"])["data"]] == ["org/m"]
    headers = {name.lower() for name, _ in ok["headers"]}
    assert b"x-content-type-options" not in headers  # no SecurityMiddleware here
    refused = await get("/v1/models", [])
    assert refused["status"] == 401
    assert json.loads(refused["body"])["error"]["code"] == "missing_api_key"
    # The rest of the site keeps the full stack.
    site = await get("/healthz", [])
    assert b"x-content-type-options" in {name.lower() for name, _ in site["headers"]}
    # The handler's ORM thread keeps its connection (handler.py); the test database must
    # not see it at teardown.
    await sync_to_async(lambda: connection.close())()


def test_a_connection_that_failed_is_closed_for_the_next_query(monkeypatch):
    connection.ensure_connection()
    connection.errors_occurred = True
    monkeypatch.setattr(connection, "is_usable", lambda: False)
    _drop_broken_connections()
    assert connection.connection is None
    assert connection.errors_occurred is False


class Unread:
    """An ASGI `receive` that counts how often the handler asked for the body."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.asked = 0

    async def __call__(self) -> dict:
        self.asked += 1
        return {"type": "http.request", "body": self.body, "more_body": False}


async def call_handler(headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict, Unread]:
    from controlplane.asgi import api_app

    receive, sent = Unread(body), []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"",
        "query_string": b"", "root_path": "", "scheme": "http", "headers": headers,
        "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
    }  # fmt: skip
    await api_app(scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    answered = {name.lower(): value for name, value in start["headers"]}
    assert answered[b"x-request-id"].startswith(b"req_")  # every answer names its request
    return start["status"], json.loads(body_out), receive


async def test_even_a_public_answer_carries_its_request_id():
    from controlplane.asgi import api_app

    sent = []

    async def send(message: dict) -> None:
        sent.append(message)

    receive = staying_client([{"type": "http.request", "body": b"", "more_body": False}])

    scope = {
        "type": "http", "method": "GET", "path": "/v1/openapi.json", "raw_path": b"",
        "query_string": b"", "root_path": "", "scheme": "http", "headers": [],
        "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
    }  # fmt: skip
    await api_app(scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    assert any(name.lower() == b"x-request-id" for name, _ in start["headers"])


async def test_a_request_without_an_active_key_is_refused_before_its_body_is_read(settings):
    from asgiref.sync import sync_to_async

    body = b'{"model": "org/m", "messages": []}'
    for authorization in (b"", b"Bearer nope", b"Bearer llmf-" + b"x" * 43, b"Basic abc"):
        headers = [(b"content-type", b"application/json")]
        headers += [(b"authorization", authorization)] if authorization else []
        status, answer, receive = await call_handler(headers, body)
        assert status == 401, answer
        assert receive.asked == 0  # not a byte of the body was read
    _, raw_key = await sync_to_async(make_api_key)()
    too_large = str(settings.GATEWAY_MAX_BODY_BYTES + 1).encode()
    status, answer, receive = await call_handler(
        [(b"authorization", f"Bearer {raw_key}".encode()), (b"content-length", too_large)], body
    )
    assert (status, answer["error"]["code"], receive.asked) == (413, "request_too_large", 0)
    await sync_to_async(lambda: connection.close())()


def staying_client(messages: list[dict]) -> Callable[[], Awaitable[dict]]:
    """An ASGI `receive`: `messages` in order, then nothing (the client stays connected)."""

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return receive


def api_scope(raw_key: str, path: str = "/v1/chat/completions") -> dict:
    return {
        "type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "scheme": "http",
        "headers": [(b"authorization", f"Bearer {raw_key}".encode())],
        "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
    }  # fmt: skip


async def test_a_post_to_an_api_is_served_from_its_scope_its_body_in_parts_and_its_length_said():
    from asgiref.sync import sync_to_async

    from controlplane.asgi import api_app

    _, raw_key = await sync_to_async(make_api_key)()
    parts = [b'{"model": "org/none", ', b'"messages": [{"role": "user", "content": "hi"}]}']
    messages = [{"type": "http.request", "body": part, "more_body": True} for part in parts]
    messages.append({"type": "http.request", "body": b"", "more_body": False})
    sent: list[dict] = []

    receive = staying_client(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    await api_app(api_scope(raw_key), receive, send)
    start, body = sent
    headers = {name.lower(): value for name, value in start["headers"]}
    assert start["status"] == 404
    assert json.loads(body["body"])["error"]["code"] == "model_not_found"  # the whole body read
    assert headers[b"content-length"] == str(len(body["body"])).encode()  # not chunked
    assert headers[b"x-request-id"].startswith(b"req_")
    assert not body.get("more_body")
    await sync_to_async(lambda: connection.close())()


async def test_a_client_that_leaves_cancels_the_answer_and_leaves_its_task_uncancelled(monkeypatch):
    from asgiref.sync import sync_to_async

    from controlplane.asgi import api_app
    from controlplane.gateway import views

    _, raw_key = await sync_to_async(make_api_key)()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def waits_forever(*args: object) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monkeypatch.setattr(views, "serve", waits_forever)
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await started.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def request() -> int:
        await api_app(api_scope(raw_key), receive, send)
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert await asyncio.wait_for(request(), 5) == 0  # returned, its task not left cancelling
    assert cancelled.is_set()
    assert sent == []
    await sync_to_async(lambda: connection.close())()


async def test_the_servers_own_cancel_still_cancels_a_request(monkeypatch):
    from asgiref.sync import sync_to_async

    from controlplane.asgi import api_app
    from controlplane.gateway import views

    _, raw_key = await sync_to_async(make_api_key)()
    started = asyncio.Event()

    async def waits_forever(*args: object) -> None:
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(views, "serve", waits_forever)
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    receive = staying_client(messages)

    async def send(message: dict) -> None:
        raise AssertionError("nothing is sent")

    before = asyncio.all_tasks()
    task = asyncio.create_task(api_app(api_scope(raw_key), receive, send))
    await started.wait()
    task.cancel()  # uvicorn's, past WEB_DRAIN_SECONDS
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()  # the disconnect listener went with it
    await sync_to_async(lambda: connection.close())()


async def test_a_client_that_leaves_while_its_body_arrives_is_not_served(monkeypatch):
    from asgiref.sync import sync_to_async

    from controlplane.asgi import api_app
    from controlplane.gateway import views

    _, raw_key = await sync_to_async(make_api_key)()

    async def never(*args: object) -> None:
        raise AssertionError("a request whose body never came is not served")

    monkeypatch.setattr(views, "serve", never)
    messages = [
        {"type": "http.request", "body": b'{"model": ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    await api_app(api_scope(raw_key), receive, send)
    assert sent == []
    assert messages == []
    await sync_to_async(lambda: connection.close())()


async def test_the_servers_cancel_mid_stream_goes_on_up_and_the_stream_is_closed(monkeypatch):
    from asgiref.sync import sync_to_async
    from django.http import StreamingHttpResponse

    from controlplane.asgi import api_app
    from controlplane.gateway import views

    _, raw_key = await sync_to_async(make_api_key)()
    closed, first_sent = [], asyncio.Event()

    async def chunks():
        yield b"data: 1\n\n"
        await asyncio.Event().wait()  # the engine says nothing more
        yield b"unreachable"

    async def streams(*args: object) -> StreamingHttpResponse:
        response = StreamingHttpResponse(chunks(), content_type="text/event-stream")
        response._resource_closers.append(lambda: closed.append(True))  # type: ignore[attr-defined]
        return response

    monkeypatch.setattr(views, "serve", streams)
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    receive = staying_client(messages)

    async def send(message: dict) -> None:
        if message.get("body"):
            first_sent.set()

    task = asyncio.create_task(api_app(api_scope(raw_key), receive, send))
    await asyncio.wait_for(first_sent.wait(), 5)
    task.cancel()  # uvicorn's, past WEB_DRAIN_SECONDS
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed == [True]  # the stream's closers ran: its claim given back, its end counted
    await sync_to_async(lambda: connection.close())()
