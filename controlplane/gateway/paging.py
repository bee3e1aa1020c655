"""OpenAI's list paging, as /v1/files and /v1/batches answer it: newest first (oldest with
`order=asc` where the list takes it), `limit` at a time after the id `after`."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.http import HttpRequest, JsonResponse

from controlplane.gateway.errors import openai_error


def could_be_id(value: str) -> bool:
    """Whether `value` could name a stored object (a file, a batch): PostgreSQL refuses a NUL
    in a query's text with an error rather than finding no row, and no id is that long."""
    return 0 < len(value) <= 128 and "\x00" not in value


async def page_of(
    request: HttpRequest,
    owned: QuerySet[Any],
    rows: QuerySet[Any],
    *,
    id_field: str,
    name: str,
    default_limit: int,
    most: int,
    orderable: bool = False,
) -> JsonResponse:
    """One page of `rows` (the key's, filtered) as OpenAI's list object. The cursor `after`
    is looked up among `owned` (every row of the key); pages follow the primary key, which
    grows as rows are made, so a cursor and the order always agree."""
    try:
        limit = int(request.GET.get("limit", default_limit))
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        return openai_error(400, f"limit must be between 1 and {most}.", param="limit",
                            code="invalid_value")  # fmt: skip
    oldest_first = orderable and request.GET.get("order") == "asc"
    rows = rows.order_by("pk" if oldest_first else "-pk")
    if after := request.GET.get("after"):
        cursor = (
            await owned.filter(**{id_field: after}).values_list("pk", flat=True).afirst()
            if could_be_id(after)
            else None
        )
        if cursor is None:
            return openai_error(400, f"No such {name} object: {after}", param="after",
                                code=f"{name.lower()}_not_found")  # fmt: skip
        rows = rows.filter(pk__gt=cursor) if oldest_first else rows.filter(pk__lt=cursor)
    page = [row async for row in rows[: limit + 1]]
    data = [row.as_openai() for row in page[:limit]]
    return JsonResponse({
        "object": "list", "data": data, "has_more": len(page) > limit,
        "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
    })  # fmt: skip
