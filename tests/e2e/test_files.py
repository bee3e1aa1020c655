"""`/v1/files` for real: the web process (uvicorn, and daphne), the official openai client, and
the files kept on this host or in Azure Blob Storage (Azurite). An upload larger than the
body limit of every other path is taken; one larger than the files limit is refused as its
headers arrive."""

from __future__ import annotations

import json

import openai
import pytest

from agents.models import Model
from tests.e2e.gateway_support import raw_request, web_process
from tests.factories import make_api_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

FILES_MAX = 16 * 1024 * 1024


def batch_input(lines: int) -> bytes:
    """A batch input file of `lines` chat requests, each with a long prompt."""
    prompt = "tell me about " + "ships " * 100
    return "".join(
        json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "org/m", "max_tokens": 8,
                             "messages": [{"role": "user", "content": prompt}]}}) + "\n"
        for n in range(lines)
    ).encode()  # fmt: skip


@pytest.mark.parametrize(("server", "store"), [("uvicorn", "local"), ("daphne", "local"),
                                               ("uvicorn", "azure")])  # fmt: skip
def test_files_through_the_openai_client(settings, tmp_path, azurite, server, store):
    Model.objects.create(model_id="org/m", source="file:///m")
    env = {"GATEWAY_FILES_MAX_BYTES": str(FILES_MAX)}
    if store == "azure":
        env |= {"FILES_STORE": "azure://llmfleet-files/batches", **azurite.environ()}
    with web_process(settings, tmp_path, server, **env) as (url, _):
        _, raw_key = make_api_key("files")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0)
        content = batch_input(9000)  # about 6 MiB: past GATEWAY_MAX_BODY_BYTES (4 MiB)
        assert settings.GATEWAY_MAX_BODY_BYTES < len(content) < FILES_MAX
        made = client.files.create(file=("input.jsonl", content), purpose="batch")
        assert (made.bytes, made.purpose, made.filename) == (len(content), "batch", "input.jsonl")
        assert client.files.retrieve(made.id).id == made.id
        assert [entry.id for entry in client.files.list()] == [made.id]
        assert client.files.content(made.id).content == content

        with pytest.raises(openai.BadRequestError) as bad:
            client.files.create(file=("bad.jsonl", content + b"{oops\n"), purpose="batch")
        assert "Line 9001: not valid JSON" in bad.value.message

        assert client.files.delete(made.id).deleted is True
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(made.id)
        assert list(client.files.list()) == []

        # Over the files limit, declared: 413 as the headers arrive, nothing of it read.
        head = (
            f"POST /v1/files HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {raw_key}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {10 * 1024**3}\r\n\r\n"
        ).encode()
        answer = raw_request(url, head)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
