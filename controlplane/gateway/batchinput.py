"""A batch input file, as OpenAI's Batch API takes it: JSON lines, each one request.

    {"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "org/m", "messages": [...]}}

Checked line by line, the first bad one named, before anything is stored: a file that is
accepted runs every line, and one that is not leaves nothing behind. What needs the database
(the models named, whether the key may use them) is the caller's to check, with
`BatchInput.models`.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import dataclass
from typing import Any

from controlplane.gateway.apis import Api
from controlplane.gateway.validation import InvalidRequest, parse_request

# The endpoints a batch's lines may call (OpenAI's, and llmfleet's four POST APIs).
BATCH_ENDPOINTS = {
    "/v1/chat/completions": Api.CHAT,
    "/v1/completions": Api.COMPLETIONS,
    "/v1/embeddings": Api.EMBEDDINGS,
    "/v1/responses": Api.RESPONSES,
}
_MAX_CUSTOM_ID = 512


class BadBatchInput(ValueError):
    """A file refused as batch input: the message names the first bad line."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"Line {line}: {message}" if line is not None else message)
        self.line = line


@dataclass(frozen=True)
class BatchLine:
    number: int  # from 1, as editors count
    custom_id: str
    url: str
    body: dict[str, Any]

    @property
    def model_id(self) -> str:
        return str(self.body["model"])

    @property
    def api(self) -> Api:
        return BATCH_ENDPOINTS[self.url]


@dataclass(frozen=True)
class BatchInput:
    lines: tuple[BatchLine, ...]

    @property
    def models(self) -> dict[str, BatchLine]:
        """Each model named, with the first line that names it (what a refusal points at)."""
        first: dict[str, BatchLine] = {}
        for line in self.lines:
            first.setdefault(line.model_id, line)
        return first


async def read_batch_input(data: bytes, max_tokens: int) -> BatchInput:
    """The file's lines, every one checked as its endpoint would check it; raises
    BadBatchInput naming the first that is not a request llmfleet can run.

    Read a slice of a few milliseconds at a time: the file is read in the event loop that
    serves requests (a web process's), and would otherwise hold their answers for as long as
    it takes (about half a second for 10,000 lines). A thread would not do: it holds the GIL
    in slices of its own."""
    parser = _Parser(data, max_tokens)
    while True:
        if parser.step(_SLICE_SECONDS):
            return parser.result()
        await asyncio.sleep(0)  # the loop's other work, between two slices


# How long read_batch_input reads before it lets the event loop run.
_SLICE_SECONDS = 0.002


class _Parser:
    def __init__(self, data: bytes, max_tokens: int) -> None:
        # Line by line as they are read (JSON lines end at "\n" alone; a string may hold
        # other line separators), not the whole file split at once.
        self.rows = enumerate(io.BytesIO(data), start=1)
        self.max_tokens = max_tokens
        self.lines: list[BatchLine] = []
        self.seen: set[str] = set()

    def step(self, seconds: float) -> bool:
        """Read lines for about `seconds`; True once every line is read."""
        until = time.perf_counter() + seconds
        for number, read in self.rows:
            try:
                raw = read.decode()
            except UnicodeDecodeError as exc:
                raise BadBatchInput(f"not UTF-8 text ({exc}).", number) from None
            if raw.strip():
                line = _line(raw, number, self.max_tokens)
                if line.custom_id in self.seen:
                    raise BadBatchInput(f"the custom_id `{line.custom_id}` is used twice.", number)
                self.seen.add(line.custom_id)
                self.lines.append(line)
            if number % 32 == 0 and time.perf_counter() >= until:
                return False
        return True

    def result(self) -> BatchInput:
        if not self.lines:
            raise BadBatchInput("The file holds no request: a batch input file is JSON lines.")
        return BatchInput(tuple(self.lines))


def _line(raw: str, number: int, max_tokens: int) -> BatchLine:
    try:
        item = json.loads(raw)
    except ValueError as exc:
        raise BadBatchInput(f"not valid JSON ({exc}).", number) from None
    if not isinstance(item, dict):
        raise BadBatchInput("a line must be a JSON object.", number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > _MAX_CUSTOM_ID:
        raise BadBatchInput(
            f"custom_id must be a string of 1 to {_MAX_CUSTOM_ID} characters.", number
        )
    if item.get("method") != "POST":
        raise BadBatchInput("method must be POST.", number)
    url = item.get("url")
    if url not in BATCH_ENDPOINTS:
        raise BadBatchInput(f"url must be one of {', '.join(BATCH_ENDPOINTS)}.", number)
    body = item.get("body")
    if not isinstance(body, dict):
        raise BadBatchInput("body must be a JSON object.", number)
    try:
        parsed = parse_request(json.dumps(body).encode(), BATCH_ENDPOINTS[url],
                               max_tokens=max_tokens)  # fmt: skip
    except InvalidRequest as exc:
        raise BadBatchInput(f"{exc}", number) from None
    if parsed.stream:
        raise BadBatchInput("a batch's requests are not streamed: leave out stream.", number)
    return BatchLine(number, custom_id, url, body)
