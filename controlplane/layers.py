"""A Channels layer kept in a SQLite file, for embedded single-machine runs.

Channels' in-memory layer cannot carry an event from a Celery worker to the
web process's WebSocket consumers, and Redis is not there when nothing is
configured. Every process on the machine opens the same file, so `group_send`
from the worker reaches consumers in the web process. Receivers poll (10 ms
rising to 100 ms while idle): fine for a dashboard on one machine; a fleet
configures `REDIS_URL` and gets channels_redis instead.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    expires REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS message_channel ON message (channel, id);
CREATE TABLE IF NOT EXISTS membership (
    group_name TEXT NOT NULL,
    channel TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (group_name, channel)
);
"""


class SQLiteChannelLayer(BaseChannelLayer):
    """Channel layer whose queues and groups live in one SQLite file shared by processes."""

    extensions = ["groups", "flush"]

    def __init__(
        self,
        path: str,
        expiry: int = 60,
        group_expiry: int = 86400,
        capacity: int = 100,
        channel_capacity: dict[str, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity)
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.group_expiry = group_expiry
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def in_thread() -> T:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                result = work(db)
                db.execute("COMMIT")
                return result
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                db.close()

        return await asyncio.to_thread(in_thread)

    def _enqueue(self, db: sqlite3.Connection, channel: str, body: bytes, now: float) -> bool:
        (queued,) = db.execute(
            "SELECT count(*) FROM message WHERE channel = ? AND expires > ?", (channel, now)
        ).fetchone()
        if queued >= self.get_capacity(channel):
            return False
        db.execute(
            "INSERT INTO message (channel, expires, body) VALUES (?, ?, ?)",
            (channel, now + self.expiry, body),
        )
        return True

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        body = msgpack.packb(message, use_bin_type=True)

        def work(db: sqlite3.Connection) -> bool:
            now = time.time()
            db.execute("DELETE FROM message WHERE expires <= ?", (now,))
            return self._enqueue(db, channel, body, now)

        if not await self._run(work):
            raise ChannelFull(channel)

    async def receive(self, channel: str) -> dict[str, Any]:
        self.require_valid_channel_name(channel)

        def work(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "DELETE FROM message WHERE id = (SELECT id FROM message"
                " WHERE channel = ? AND expires > ? ORDER BY id LIMIT 1) RETURNING body",
                (channel, time.time()),
            ).fetchone()
            return None if row is None else bytes(row[0])

        delay = 0.01
        while True:
            body = await self._run(work)
            if body is not None:
                message: dict[str, Any] = msgpack.unpackb(body, raw=False)
                return message
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def new_channel(self, prefix: str = "specific") -> str:
        return f"{prefix}.sqlite!{secrets.token_hex(12)}"

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        await self._run(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO membership VALUES (?, ?, ?)",
                (group, channel, time.time() + self.group_expiry),
            )
        )

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        await self._run(
            lambda db: db.execute(
                "DELETE FROM membership WHERE group_name = ? AND channel = ?", (group, channel)
            )
        )

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_group_name(group)
        body = msgpack.packb(message, use_bin_type=True)

        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            members = db.execute(
                "SELECT channel FROM membership WHERE group_name = ? AND expires > ?",
                (group, now),
            ).fetchall()
            # Like channels_redis: a member whose queue is full misses this message.
            for (channel,) in members:
                self._enqueue(db, channel, body, now)

        await self._run(work)

    async def flush(self) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM message")
            db.execute("DELETE FROM membership")

        await self._run(work)

    async def close(self) -> None:
        """Nothing is held open between calls."""
