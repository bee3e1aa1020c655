"""Writing many rows' columns in one statement per batch.

Django's `bulk_update` builds a `CASE WHEN pk = … THEN …` expression per row and
field; for a heartbeat round of 1,000 agents that is 13,000 expressions and
seconds of CPU in the ORM alone (bench/fleet.py). This joins the table to a
`VALUES` list instead, which PostgreSQL and SQLite (3.33+) both run as one
UPDATE, in time that grows linearly with the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db import connection
from django.db import models as djmodels


def update_rows(
    objects: Sequence[djmodels.Model], fields: Sequence[str], *, batch_size: int = 500
) -> None:
    """Write `fields` of every object (all of one model) to its row, by primary key."""
    if not objects:
        return
    meta = objects[0]._meta
    pk = meta.pk
    assert pk is not None
    columns: list[Any] = [pk, *(meta.get_field(name) for name in fields)]
    quote = connection.ops.quote_name
    table = quote(meta.db_table)
    key = quote(str(pk.column))
    aliases = [f"c{index}" for index in range(len(columns))]

    def typed(index: int) -> str:
        # PostgreSQL types a VALUES column from its parameters (NULL alone is text): cast
        # each to its column's type. SQLite's columns take any value as it is.
        if connection.vendor == "postgresql":
            return f"v.{aliases[index]}::{columns[index].db_type(connection)}"
        return f"v.{aliases[index]}"

    assignments = ", ".join(
        f"{quote(column.column)} = {typed(index)}" for index, column in enumerate(columns) if index
    )
    with connection.cursor() as cursor:
        for start in range(0, len(objects), batch_size):
            batch = objects[start : start + batch_size]
            row = "(" + ", ".join(["%s"] * len(columns)) + ")"
            params = [
                column.get_db_prep_save(getattr(obj, column.attname), connection)
                for obj in batch
                for column in columns
            ]
            cursor.execute(
                f"WITH v({', '.join(aliases)}) AS (VALUES {', '.join([row] * len(batch))}) "  # noqa: S608 - names are the model's own, values are parameters
                f"UPDATE {table} SET {assignments} FROM v "
                f"WHERE {table}.{key} = {typed(0)}",
                params,
            )
