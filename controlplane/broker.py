"""Celery's brokers, made to survive what kombu's own do not.

The embedded broker (no REDIS_URL) is kombu's file-system transport, made safe to share.

kombu's own creates a message's file and then writes it, and a consumer that lists the folder
in between moves the file away and reads it empty: `JSONDecodeError` in `_get`, and the
worker stops (`Unrecoverable error`; kombu #1551). Two consumers moving the same file to
another filesystem (the system's temporary folder) can also both copy it. Here:

- a message is written under a name no consumer looks at, then renamed into place: a
  consumer sees a whole message or none;
- a consumer claims a message by renaming it into `.claimed/` in the same folder, which one
  consumer alone can do;
- a message that does not decode is moved to `dropped/` beside the queue (kept for an
  operator to read), logged, and counted in `llmfleet_broker_messages_dropped_total`; the
  worker goes on with the next one.

Selected by the broker URL `llmfleetfs://` (settings.CELERY_BROKER_URL when no REDIS_URL).

With Redis, kombu's transport decodes each message it pops (BRPOP) before Celery sees it, and
one that does not decode stops the worker the same way. `redis://` and `rediss://` URLs take
`RedisTransport` here: such a message (already popped) is logged with its first bytes,
counted in Redis (`llmfleet:broker:dropped`, what /metrics reports), and the worker goes on.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem, redis
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

SCHEME = "llmfleetfs"
REDIS_DROPPED_KEY = "llmfleet:broker:dropped"
CLAIMED = ".claimed"
DROPPED = "dropped"


def transport_options(broker_dir: Path) -> dict[str, Any]:
    """What settings give the transport: one folder that producers (web, beat) and workers
    share."""
    return {
        "data_folder_in": str(broker_dir / "queue"),
        "data_folder_out": str(broker_dir / "queue"),
        "control_folder": str(broker_dir / "control"),
        "store_processed": False,
        # The transport polls its folder; kombu's 1 s default would add up to a second to
        # every cold start's queue time.
        "polling_interval": 0.1,
    }


def dropped_count() -> int | None:
    """How many broker messages workers could not decode and dropped, ever (for /metrics):
    counted in Redis, or the files the embedded broker set aside; None when Redis does not
    answer (the other fleet series are still reported)."""
    from django.conf import settings

    if settings.REDIS_URL:
        import redis as redis_client

        try:
            with redis_client.Redis.from_url(settings.REDIS_URL, socket_timeout=1.0) as client:
                return int(client.get(REDIS_DROPPED_KEY) or 0)
        except redis_client.RedisError:
            log.warning("the broker's dropped-message count is unavailable: Redis does not answer")
            return None
    try:
        return sum(1 for _ in (settings.BROKER_DIR / DROPPED).iterdir())
    except FileNotFoundError:
        return 0


class Channel(filesystem.Channel):
    # (kombu's own two base classes name the argument differently: payload, as the one we extend)
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        """Write `payload` whole under a name consumers skip, then rename it into place."""
        folder = self.data_folder_out
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        partial = os.path.join(folder, f".partial-{uuid.uuid4()}")
        try:
            with open(partial, "wb") as out:
                out.write(str_to_bytes(dumps(payload)))
            os.rename(partial, os.path.join(folder, name))
        except OSError as exc:
            raise ChannelError(f"Cannot add message {name!r} to {folder}") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        """The oldest whole message of `queue`, claimed by this consumer alone."""
        wanted = f"{queue}.msg"
        folder = self.data_folder_in
        claimed = os.path.join(folder, CLAIMED)
        os.makedirs(claimed, exist_ok=True)
        for name in sorted(os.listdir(folder)):
            if name.partition(".")[2] != wanted:
                continue
            mine = os.path.join(claimed, f"{os.getpid()}-{name}")
            try:
                os.rename(os.path.join(folder, name), mine)
            except FileNotFoundError:
                continue  # another consumer claimed it first
            with open(mine, "rb") as message:
                raw = message.read()
            try:
                payload = loads(bytes_to_str(raw))
            except ValueError as exc:
                self._drop(mine, name, exc)
                continue
            os.remove(mine)
            return payload
        raise Empty()

    def _drop(self, path: str, name: str, error: Exception) -> None:
        dropped = Path(self.data_folder_in).parent / DROPPED
        dropped.mkdir(exist_ok=True)
        os.replace(path, dropped / name)
        log.error(
            "dropped broker message %s: it does not decode (%s); kept in %s", name, error, dropped
        )


class Transport(filesystem.Transport):
    Channel = Channel


class RedisChannel(redis.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        try:
            delivered: bool = super()._brpop_read(**options)  # type: ignore[misc]
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: popped, undecodable
            document = getattr(exc, "doc", "") or getattr(exc, "object", b"")
            log.error("dropped a broker message that does not decode (%s): %r", exc,
                      document[:200])  # fmt: skip
            self.client.incr(REDIS_DROPPED_KEY)
            raise Empty() from None
        return delivered


class RedisTransport(redis.Transport):
    Channel = RedisChannel


TRANSPORT_ALIASES[SCHEME] = f"{__name__}:Transport"
TRANSPORT_ALIASES["redis"] = TRANSPORT_ALIASES["rediss"] = f"{__name__}:RedisTransport"
