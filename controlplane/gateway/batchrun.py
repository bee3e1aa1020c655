"""Running a batch (the `batches` worker's gateway.tasks.run_batch): each line through the
gateway's own path, as a request of the batch's key in the `batch` class, so that routing,
admission (interactive requests first), cold starts and usage are those of any request.

- One runner at a time holds a batch (`batchactions.claim`), and renews its hold a third of
  the way through it from its claim to its end. A runner that dies (its worker killed) stops
  renewing, and beat's gateway.tasks.resume_batches starts another once the hold lapses. A
  runner that cannot renew within its hold stops sending, and every write it would still
  make is refused (`batchactions.NotHeld`): the runner that took over makes them.
- Each line's outcome is journalled by `custom_id` as its answer comes. A resumed runner
  skips every journalled line, so a line whose answer was journalled is never sent again
  (one in flight when its runner died is sent again: its answer had not been kept).
- Lines go model by model, in the file's order within each, so each model of a batch
  cold-starts once; at most BATCH_CONCURRENCY of them are in flight, reached by a slow
  start (_FIRST_WINDOW lines, one more as each line ends) rather than all at once: a
  burst of a batch's first lines would take the agents' and engines' time from the
  interactive requests of that moment.
- Lines yield to interactive traffic: in the gateway's queues (the `batch` class) and on
  each engine, which lets them in only while its reserve of seats stays free
  (nodeagent.batchgate). For the first BATCH_IDLE_WAIT_PERCENT of its window a batch loads a
  model only on idle capacity (free GPU memory, or models idle for BATCH_IDLE_EVICT_SECONDS);
  while there is none, that model's lines wait and the batch's other models go on.
- A line refused for want of room (429, 503 queue_timeout, engine_busy, no_idle_capacity)
  did not run: it is sent again later, until the batch's window ends (a model that cannot be
  started at all, 503 model_not_ready, a few times only). A line the gateway itself failed
  on is tried a few times, then journalled as failed.
- Cancelled: no new line is sent, those in flight finish, and the files are written for what
  ran. Expired: lines not run go to the error file as `batch_expired`. A key revoked or
  expired meanwhile: its lines fail with 401, as its requests would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.http import HttpResponseBase

from agents.choices import LoadTrigger
from agents.scheduling import batch_waits_for_idle
from controlplane.gateway import batchactions, filestore
from controlplane.gateway.batchactions import NotHeld
from controlplane.gateway.batchinput import BadBatchInput, BatchLine, read_batch_input
from controlplane.gateway.coldstart import Asked
from controlplane.gateway.errors import openai_error
from controlplane.gateway.handler import new_request_id
from controlplane.gateway.models import ApiKey, Batch, BatchStatus
from controlplane.gateway.state import close_current
from nodeagent.store.base import StoreError

log = logging.getLogger(__name__)

# Answers that say a line did not run, for want of room: it is sent again later.
_NOT_RUN = {429, 503}
# A model that could not be started at all (503 model_not_ready, after its cold start's own
# wait) is asked this often before its lines are journalled as failed; so is a line the
# gateway failed on (an exception, not an answer).
_MOST_TRIES = 3
_RETRY_PAUSE_SECONDS = 2.0
# A model without idle capacity for its load: its lines are not sent again before this.
_IDLE_RECHECK_SECONDS = 10.0
# Lines in flight at a batch's start (its slow start grows this by one as each line ends).
_FIRST_WINDOW = 4


def run(batch_pk: int) -> None:
    """Run the batch to its end, unless another runner holds it. Its database calls go through
    this (the worker's) thread: each batch its own, none waiting behind another's."""
    runner = uuid.uuid4().hex
    if not batchactions.claim(batch_pk, runner):
        return
    async_to_sync(_run)(batch_pk, runner)


async def _run(batch_pk: int, runner: str) -> None:
    try:
        await Runner(batch_pk, runner).run()
    except NotHeld:
        log.warning("batch %s: another runner holds it now; this one stopped", batch_pk)
    finally:
        await close_current()  # this loop's gateway state: its usage written, sessions closed


class Runner:
    def __init__(self, batch_pk: int, runner: str) -> None:
        self.batch_pk, self.runner = batch_pk, runner
        self.stopping = False  # cancelled, expired, or the hold lost: no new line is sent
        self.lost = False  # the hold lost: this runner writes nothing more
        self.tries: dict[str, int] = {}  # custom_id → tries that did not count (see _again)
        self.renewed_at = time.monotonic()
        # model → monotonic time before which its lines are not sent (no idle capacity)
        self.deferred: dict[str, float] = {}
        self.window = 0  # lines that may be in flight now (_send's slow start)

    async def run(self) -> None:
        batch = await Batch.objects.select_related("api_key").aget(pk=self.batch_pk)
        self.key = batch.api_key
        self.key.allowed_ids = {
            pk async for pk in self.key.allowed_models.values_list("pk", flat=True)
        }
        self.created_at, self.expires_at = (
            batch.created_at.timestamp(),
            batch.expires_at.timestamp(),
        )
        renewing = asyncio.ensure_future(self._renew())
        try:
            if batch.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
                await self._run_lines(batch)
            if not self.lost:
                await sync_to_async(batchactions.finalize)(self.batch_pk, self.runner)
        finally:
            renewing.cancel()

    async def _run_lines(self, batch: Batch) -> None:
        lines = await self._lines(batch)
        if lines is None:
            return
        await sync_to_async(batchactions.start)(self.batch_pk, self.runner)
        if not self._should_stop():
            await self._send(lines)
        if self.lost or time.time() < self.expires_at:
            return
        done = await sync_to_async(batchactions.journalled)(self.batch_pk)
        unfinished = [(line.number, line.custom_id) for line in lines
                      if line.custom_id not in done]  # fmt: skip
        await sync_to_async(batchactions.expire_unfinished)(self.batch_pk, self.runner, unfinished)

    async def _lines(self, batch: Batch) -> list[BatchLine] | None:
        """The input's lines, checked again (its models may have gone since it was created);
        None when the batch failed on them. A store that does not answer raises: the batch is
        resumed once it does."""
        try:
            try:
                data = await asyncio.to_thread(filestore.current().get, batch.input_name)
            except StoreError as exc:
                if exc.status != 404:
                    raise
                raise BadBatchInput(f"The input file {batch.input_name} is gone.") from None
            parsed = await read_batch_input(data, settings.GATEWAY_MAX_TOKENS)
            wrong = next((line for line in parsed.lines if line.url != batch.endpoint), None)
            if wrong is not None:
                raise BadBatchInput(
                    f"url {wrong.url} is not the batch's endpoint {batch.endpoint}.", wrong.number
                )
        except BadBatchInput as exc:
            error = {"code": "invalid_batch_input", "message": str(exc), "param": None,
                     "line": exc.line}  # fmt: skip
            await sync_to_async(batchactions.fail)(self.batch_pk, self.runner, [error])
            return None
        return list(parsed.lines)

    async def _renew(self) -> None:
        """Renew the hold a third of the way through it; learn of a cancel, a key revoked, or
        the hold lost (another runner holds it, or no renewal got through within the hold)."""
        every = settings.BATCH_LEASE_SECONDS / 3
        while True:
            await asyncio.sleep(every)
            try:
                batch = await sync_to_async(batchactions.renew)(self.batch_pk, self.runner)
            except NotHeld:
                self.stopping = self.lost = True
                return
            except Exception:
                log.exception("batch %s: could not renew its runner's hold", self.batch_pk)
                if time.monotonic() - self.renewed_at >= settings.BATCH_LEASE_SECONDS - every:
                    self.stopping = self.lost = True  # another runner may take it any moment
                    return
                continue
            self.renewed_at = time.monotonic()
            self.key.revoked_at, self.key.expires_at = (
                batch.api_key.revoked_at,
                batch.api_key.expires_at,
            )
            if batch.status == BatchStatus.CANCELLING:
                self.stopping = True

    def _should_stop(self) -> bool:
        return self.stopping or time.time() >= self.expires_at

    async def _send(self, lines: list[BatchLine]) -> None:
        done = await sync_to_async(batchactions.journalled)(self.batch_pk)
        waiting = [line for line in by_model(lines) if line.custom_id not in done]
        self.window = min(_FIRST_WINDOW, settings.BATCH_CONCURRENCY)
        slots = asyncio.Semaphore(self.window)
        running: set[asyncio.Task[None]] = set()
        while waiting and not self._should_stop():
            retry: list[BatchLine] = []
            for line in waiting:
                if self._deferred(line):
                    retry.append(line)  # its model waits for idle capacity: the others go on
                    continue
                await slots.acquire()
                if self._should_stop():
                    slots.release()
                    break
                if self._deferred(line):  # deferred while this waited for a slot
                    slots.release()
                    retry.append(line)
                    continue
                task = asyncio.ensure_future(self._one(line, slots, retry))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)
            waiting = sorted(retry, key=lambda line: line.number)
            if waiting:
                await asyncio.sleep(self._pause(waiting))
        await asyncio.gather(*running)  # lines in flight finish, whatever stopped the rest

    def _deferred(self, line: BatchLine) -> bool:
        return self.deferred.get(line.model_id, 0.0) > time.monotonic()

    def _pause(self, waiting: list[BatchLine]) -> float:
        """Until lines may be sent again: a short pause, or, when every one waiting is of a
        model deferred for want of idle capacity, until the first deferral ends."""
        now = time.monotonic()
        ends = [self.deferred.get(line.model_id, 0.0) for line in waiting]
        if min(ends) <= now:
            return _RETRY_PAUSE_SECONDS
        return min(min(ends) - now, max(self.expires_at - time.time(), 0.0))

    def _asked(self) -> Asked:
        """How a cold start for the batch's line may take capacity (actions.ensure_placement)."""
        if batch_waits_for_idle(time.time(), self.created_at, self.expires_at,
                                settings.BATCH_IDLE_WAIT_PERCENT):  # fmt: skip
            return Asked(LoadTrigger.BATCH, float(settings.BATCH_IDLE_EVICT_SECONDS))
        return Asked(LoadTrigger.BATCH)

    async def _one(self, line: BatchLine, slots: asyncio.Semaphore, retry: list[BatchLine]) -> None:
        request_id = new_request_id()
        ran = False  # whether its answer is kept: only that grows the slow start's window
        try:
            response = await _serve(self.key, line, request_id, self._asked())
            body = _body_of(response)
            if _code_of(body) == "no_idle_capacity":
                self.deferred[line.model_id] = time.monotonic() + _IDLE_RECHECK_SECONDS
            if response.status_code in _NOT_RUN and self._again(line, body):
                retry.append(line)
                return
            ran = True
            await self._journal(line, response.status_code, body, request_id)
        except NotHeld:
            self.stopping = self.lost = True
        except Exception as exc:
            log.exception("batch %s: line %d failed in the gateway", self.batch_pk, line.number)
            if self._again(line, None):
                retry.append(line)
                return
            error = {"code": "internal_error", "message": f"llmfleet failed on it: {exc}"[:500]}
            await self._journal(line, 500, None, request_id, error)
        finally:
            slots.release()
            if ran and self.window < settings.BATCH_CONCURRENCY:  # the slow start: one more
                self.window += 1
                slots.release()

    async def _journal(
        self, line: BatchLine, status: int, body: object, request_id: str,
        error: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        if not self.lost:
            await sync_to_async(batchactions.journal)(
                self.batch_pk, self.runner, line.custom_id, line.number, status, body,
                request_id, error,
            )  # fmt: skip

    def _again(self, line: BatchLine, body: object) -> bool:
        """Whether a line that did not run is sent again: one refused for want of room,
        always; one whose model could not be started (model_not_ready), or on which the
        gateway failed (`body` None), until its _MOST_TRIES-th time."""
        counted = body is None or _code_of(body) == "model_not_ready"
        if not counted:
            return True
        tries = self.tries[line.custom_id] = self.tries.get(line.custom_id, 0) + 1
        return tries < _MOST_TRIES


def by_model(lines: Sequence[BatchLine]) -> list[BatchLine]:
    """The lines model by model (in the order each model first appears), each model's in the
    file's order: a model cold-starts once for the batch, not once per interleaving."""
    first: dict[str, int] = {}
    for line in lines:
        first.setdefault(line.model_id, line.number)
    return sorted(lines, key=lambda line: (first[line.model_id], line.number))


def _code_of(body: object) -> object:
    """The OpenAI error code of an answer's body, if it is an error."""
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


async def _serve(key: ApiKey, line: BatchLine, request_id: str, asked: Asked) -> HttpResponseBase:
    from controlplane.gateway.auth import AuthFailure
    from controlplane.gateway.views import serve

    async def found(state: object) -> ApiKey | AuthFailure:
        reason = key.inactive_reason()
        if reason is not None:  # as its own requests are answered
            return AuthFailure(openai_error(401, f"This API key has been {reason}.",
                                            code=f"{reason}_api_key"))  # fmt: skip
        return key

    raw = json.dumps(line.body).encode()
    return await serve(line.api, "POST", found, lambda: raw, request_id, lambda name: None,
                       batch_line=asked)  # fmt: skip


def _body_of(response: HttpResponseBase) -> object:
    content = getattr(response, "content", b"")
    try:
        return json.loads(content)
    except ValueError:
        return {"error": {"message": content[:500].decode(errors="replace"), "code": None}}
