"""`/v1/files`: a batch's input uploaded, listed, read and deleted by the key that owns it;
bad input refused naming its first bad line, with nothing stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from agents.choices import ModelKind
from controlplane.gateway import filestore
from controlplane.gateway.models import StoredFile
from nodeagent.store.base import StoreError
from tests.factories import ModelFactory, make_api_key
from tests.gateway.calls import error_of

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def files_here(settings: Any, tmp_path: Path) -> Path:
    settings.VAR_DIR = tmp_path
    settings.FILES_STORE = ""
    ModelFactory(model_id="org/m")
    ModelFactory(model_id="org/embed", kind=ModelKind.EMBEDDING)
    ModelFactory(model_id="org/private")
    return tmp_path / "files"


def line(custom_id: str = "r1", url: str = "/v1/chat/completions", **body: Any) -> str:
    request = {"model": "org/m", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": request})


def upload(client: Any, raw_key: str, content: str | bytes, purpose: str = "batch") -> Any:
    data = content.encode() if isinstance(content, str) else content
    return client.post(
        "/v1/files",
        {"purpose": purpose, "file": SimpleUploadedFile("input.jsonl", data)},
        HTTP_AUTHORIZATION=f"Bearer {raw_key}",
    )


def get(client: Any, raw_key: str, url: str) -> Any:
    return client.get(url, HTTP_AUTHORIZATION=f"Bearer {raw_key}")


def test_a_batch_file_is_uploaded_listed_read_and_deleted_by_its_key(client, files_here):
    _, raw = make_api_key("owner")
    content = "\n".join([line("r1"), line("r2", max_tokens=5), ""]) + "\n"
    answer = upload(client, raw, content)
    assert answer.status_code == 200, answer.content
    made = answer.json()
    assert made["object"] == "file"
    assert (made["purpose"], made["bytes"], made["filename"]) == (
        "batch",
        len(content),
        "input.jsonl",
    )
    assert made["id"].startswith("file-")
    assert StoredFile.objects.get().lines == 2
    assert get(client, raw, f"/v1/files/{made['id']}").json() == made
    listed = get(client, raw, "/v1/files").json()
    assert [entry["id"] for entry in listed["data"]] == [made["id"]]
    assert (listed["object"], listed["has_more"]) == ("list", False)
    body = get(client, raw, f"/v1/files/{made['id']}/content")
    assert body.content == content.encode()
    assert (files_here / made["id"]).read_bytes() == content.encode()

    deleted = client.delete(f"/v1/files/{made['id']}", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert deleted.json() == {"id": made["id"], "object": "file", "deleted": True}
    assert error_of(get(client, raw, f"/v1/files/{made['id']}"), 404)["code"] == "file_not_found"
    assert not (files_here / made["id"]).exists()


def test_another_keys_file_is_as_unknown_as_none(client):
    _, owner = make_api_key("owner")
    _, other = make_api_key("other")
    made = upload(client, owner, line()).json()
    for url in (f"/v1/files/{made['id']}", f"/v1/files/{made['id']}/content"):
        assert error_of(get(client, other, url), 404)["code"] == "file_not_found"
    gone = client.delete(f"/v1/files/{made['id']}", HTTP_AUTHORIZATION=f"Bearer {other}")
    error_of(gone, 404)
    assert get(client, other, "/v1/files").json()["data"] == []
    assert StoredFile.objects.count() == 1


@pytest.mark.parametrize(
    ("content", "told"),
    [
        (line() + "\n{not json", "Line 2: not valid JSON"),
        (line("a") + "\n" + line("a"), "Line 2: the custom_id `a` is used twice"),
        ("[1]", "Line 1: a line must be a JSON object"),
        (
            json.dumps({"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {}}),
            "Line 1: method must be POST",
        ),
        (line(url="/v1/images"), "Line 1: url must be one of"),
        (line(custom_id=""), "Line 1: custom_id must be a string"),
        (line(max_tokens=0), "Line 1: 'max_tokens' must be between"),
        (line(stream=True), "Line 1: a batch's requests are not streamed"),
        (line("a") + "\n" + line("b", model="org/nope"), "Line 2: The model `org/nope` does not"),
        (line(model="org/private"), "Line 1: The model `org/private` does not exist"),
        (line(model="org/embed"), "Line 1: The model `org/embed` is of kind `embedding`"),
        ("\n\n", "The file holds no request"),
        (b"\xff\xfe", "Line 1: not UTF-8 text"),
    ],
)
def test_bad_batch_input_is_400_naming_its_first_bad_line_with_nothing_stored(
    client, files_here, content, told
):
    _, raw = make_api_key("limited", model_ids=("org/m", "org/embed"))
    error = error_of(upload(client, raw, content), 400)
    assert told in error["message"], error["message"]
    assert (error["param"], error["code"]) == ("file", "invalid_batch_input")
    assert not StoredFile.objects.exists()
    assert not files_here.exists() or not any(files_here.iterdir())


def test_uploads_that_are_not_batch_input_are_refused(client, settings):
    _, raw = make_api_key("owner")
    assert error_of(upload(client, raw, line(), purpose="fine-tune"), 400)["param"] == "purpose"
    missing = client.post("/v1/files", {"purpose": "batch"}, HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert error_of(missing, 400)["param"] == "file"
    settings.GATEWAY_FILES_MAX_BYTES = 1024
    big = "\n".join(line(f"r{n}") for n in range(20))
    assert error_of(upload(client, raw, big), 413)["code"] == "file_too_large"
    assert error_of(get(client, "llmf-wrong", "/v1/files"), 401)["code"] == "invalid_api_key"
    assert not StoredFile.objects.exists()


def test_files_are_listed_a_page_at_a_time(client):
    _, raw = make_api_key("owner")
    ids = [upload(client, raw, line(f"r{n}")).json()["id"] for n in range(5)]
    page = get(client, raw, "/v1/files?limit=2").json()
    assert [entry["id"] for entry in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    rest = get(client, raw, f"/v1/files?limit=10&after={page['last_id']}").json()
    assert [entry["id"] for entry in rest["data"]] == ids[::-1][2:]
    assert rest["has_more"] is False
    oldest = get(client, raw, "/v1/files?order=asc&limit=1").json()
    assert oldest["data"][0]["id"] == ids[0]
    assert error_of(get(client, raw, "/v1/files?limit=0"), 400)["param"] == "limit"
    # Ids no object has, a NUL among them (PostgreSQL refuses it in a query): 4xx, never 5xx.
    assert error_of(get(client, raw, "/v1/files?after=%00"), 400)["param"] == "after"
    assert error_of(get(client, raw, "/v1/batches?after=%00"), 400)["param"] == "after"
    assert error_of(get(client, raw, "/v1/files/file-%00"), 404)["code"] == "file_not_found"
    assert error_of(get(client, raw, "/v1/batches/b%00"), 404)["code"] == "batch_not_found"
    assert get(client, raw, "/v1/files?purpose=%00").json()["data"] == []


def test_a_store_that_fails_leaves_neither_row_nor_bytes(client, monkeypatch, files_here):
    _, raw = make_api_key("owner")

    def refuse(self: Any, name: str, data: bytes) -> None:
        raise StoreError("store_unavailable", "the store is away")

    monkeypatch.setattr(filestore.FileStore, "put", refuse)
    assert error_of(upload(client, raw, line()), 503)["code"] == "file_store_unavailable"
    assert not StoredFile.objects.exists()
    monkeypatch.undo()

    def fail(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database went away")

    monkeypatch.setattr(StoredFile, "save", fail)
    assert upload(client, raw, line()).status_code == 500  # OpenAI-shaped, logged
    assert not any(files_here.iterdir())  # the bytes went again with the row that failed
