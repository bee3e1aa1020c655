"""Every write to a batch's state: created, claimed by a runner, each line's outcome
journalled, cancelled, finalized with its output and error files. The runner
(controlplane.gateway.batchrun) and the views call these; neither writes a batch itself.

A runner writes only while it holds the batch: each write that a runner makes checks, under
the batch's row lock, that the batch is still its own (`runner`), so a runner that stalled
past its hold and was replaced writes nothing more.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from agents import events
from controlplane.gateway import actions
from controlplane.gateway.models import (
    BATCH_RUNNING_STATES,
    ApiKey,
    Batch,
    BatchOutcome,
    BatchStatus,
    FilePurpose,
    StoredFile,
)

log = logging.getLogger(__name__)


def announce(batch_pk: int) -> None:
    """The batch's progress to the dashboard, once the transaction commits (a dashboard that
    is away is never worth a failed write: agents.events logs it)."""

    def send() -> None:
        batch = Batch.objects.select_related("api_key").filter(pk=batch_pk).first()
        if batch is not None:
            events.send(events.BATCHES, [events.batch_payload(batch)])

    transaction.on_commit(send)


class NotHeld(Exception):
    """The batch is no longer this runner's: another took it over (this one stalled)."""


def create_batch(
    key: ApiKey, input_file: StoredFile, endpoint: str, metadata: dict[str, str] | None
) -> Batch:
    """A new batch, `validating` until a runner takes it (gateway.tasks.run_batch, sent once
    the row is committed)."""
    from controlplane.gateway import tasks

    batch = Batch.objects.create(
        api_key=key, input_file=input_file, input_name=input_file.file_id, endpoint=endpoint,
        metadata=metadata, total=input_file.lines,
        expires_at=timezone.now() + timedelta(seconds=settings.BATCH_COMPLETION_WINDOW_SECONDS),
    )  # fmt: skip
    transaction.on_commit(lambda: tasks.run_batch.delay(batch.pk))
    announce(batch.pk)
    return batch


def claim(batch_pk: int, runner: str, now: datetime | None = None) -> bool:
    """Take the batch for `runner`, if it still has work and no live runner holds it (one
    conditional update: two runners never both take it)."""
    now = now or timezone.now()
    free = Q(lease_until__isnull=True) | Q(lease_until__lt=now) | Q(runner=runner)
    taken = Batch.objects.filter(pk=batch_pk, status__in=BATCH_RUNNING_STATES).filter(free)
    held = now + timedelta(seconds=settings.BATCH_LEASE_SECONDS)
    return bool(taken.update(runner=runner, lease_until=held))


def _held(batch_pk: int, runner: str) -> Batch:
    """The batch, its row locked, if `runner` still holds it; NotHeld otherwise. Call within a
    transaction."""
    batch = Batch.objects.select_for_update().filter(pk=batch_pk, runner=runner).first()
    if batch is None:
        raise NotHeld(batch_pk)
    return batch


def renew(batch_pk: int, runner: str) -> Batch:
    """Renew the runner's hold; the batch as it is now (a cancel shows in its status).
    Raises NotHeld when another runner holds it now."""
    with transaction.atomic():
        batch = _held(batch_pk, runner)
        batch.lease_until = timezone.now() + timedelta(seconds=settings.BATCH_LEASE_SECONDS)
        batch.save(update_fields=["lease_until"])
        announce(batch_pk)  # its counts since the last renewal
    return Batch.objects.select_related("api_key").get(pk=batch_pk)


def start(batch_pk: int, runner: str) -> None:
    """Validated: it runs (a batch resumed in progress keeps its first start)."""
    with transaction.atomic():
        batch = _held(batch_pk, runner)
        if batch.status == BatchStatus.VALIDATING:
            batch.status, batch.in_progress_at = BatchStatus.IN_PROGRESS, timezone.now()
            batch.save(update_fields=["status", "in_progress_at"])
            announce(batch_pk)


def fail(batch_pk: int, runner: str, errors: list[dict[str, Any]]) -> None:
    """Its input could not run at all (refused when the runner checked it before any line
    ran): `failed`, with OpenAI's `errors` list. Only a batch still `validating` fails so: one
    in progress has a journal, which finalize turns into its files."""
    with transaction.atomic():
        batch = _held(batch_pk, runner)
        if batch.status != BatchStatus.VALIDATING:
            return
        batch.status, batch.failed_at, batch.lease_until = BatchStatus.FAILED, timezone.now(), None
        batch.errors = {"object": "list", "data": errors}
        batch.save(update_fields=["status", "failed_at", "lease_until", "errors"])
        announce(batch_pk)


def journal(
    batch_pk: int, runner: str, custom_id: str, line: int, status_code: int, body: Any,
    request_id: str, error: dict[str, Any] | None = None,
) -> bool:  # fmt: skip
    """Record one line's outcome, once, while `runner` holds the batch: False when it was
    journalled already. The batch's counts move with it, in the same transaction. Raises
    NotHeld when the batch is no longer this runner's."""
    try:
        with transaction.atomic():
            _held(batch_pk, runner)
            BatchOutcome.objects.create(
                batch_id=batch_pk, custom_id=custom_id, line=line, status_code=status_code,
                body=body, error=error, request_id=request_id,
            )  # fmt: skip
            counted = "completed" if 200 <= status_code < 300 else "failed"
            Batch.objects.filter(pk=batch_pk).update(**{counted: F(counted) + 1})
    except IntegrityError:
        return False
    return True


def journalled(batch_pk: int) -> set[str]:
    """The custom_ids whose outcome is in the journal: never sent again."""
    return set(BatchOutcome.objects.filter(batch_id=batch_pk).values_list("custom_id", flat=True))


def cancel(batch: Batch) -> Batch:
    """Cancel: no new line is sent; lines in flight finish; the runner writes the files for
    what ran and ends it `cancelled`. Only a batch validating or in progress cancels (one
    finalizing or ended is answered as it is, as OpenAI does)."""
    from controlplane.gateway import tasks

    with transaction.atomic():
        batch = Batch.objects.select_for_update().get(pk=batch.pk)
        if batch.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            batch.status, batch.cancelling_at = BatchStatus.CANCELLING, timezone.now()
            batch.save(update_fields=["status", "cancelling_at"])
            announce(batch.pk)
            # A batch no runner holds yet (queued behind others) is ended by the next one.
            transaction.on_commit(lambda: tasks.run_batch.delay(batch.pk))
    return Batch.objects.select_related("output_file", "error_file").get(pk=batch.pk)


_EXPIRED = {
    "code": "batch_expired",
    "message": "This line was not run before the batch's completion window ended.",
}


def expire_unfinished(batch_pk: int, runner: str, lines: list[tuple[int, str]]) -> None:
    """The completion window ended: each line not journalled goes to the error file as
    `batch_expired`."""
    for number, custom_id in lines:
        journal(batch_pk, runner, custom_id, number, 0, None, "", dict(_EXPIRED))


def finalize(batch_pk: int, runner: str) -> None:
    """Write the output and error files from the journal, line by line in input order, and
    end the batch: `cancelled` (it was cancelling), `expired` (lines expired) or `completed`.
    Each file's id is kept as soon as it is written, so a runner that resumes a finalize that
    died writes only what is missing. Raises NotHeld when the batch is another runner's."""
    now = timezone.now()
    with transaction.atomic():
        batch = _held(batch_pk, runner)
        if batch.status not in BATCH_RUNNING_STATES:
            return
        if batch.status != BatchStatus.CANCELLING:  # cancelling stays so until its end
            batch.status = BatchStatus.FINALIZING
        batch.finalizing_at = batch.finalizing_at or now
        batch.save(update_fields=["status", "finalizing_at"])
    key = ApiKey.objects.get(pk=batch.api_key_id)
    for field, succeeded, what in (
        ("output_file", True, "output"),
        ("error_file", False, "errors"),
    ):
        if getattr(batch, f"{field}_id") is None:
            _write_file(batch, runner, key, field, succeeded, what)
    expired = BatchOutcome.objects.filter(batch_id=batch_pk, error__code="batch_expired")
    with transaction.atomic():
        batch = _held(batch_pk, runner)
        if batch.status == BatchStatus.CANCELLING:
            batch.status, batch.cancelled_at = BatchStatus.CANCELLED, now
        elif expired.exists():
            batch.status, batch.expired_at = BatchStatus.EXPIRED, now
        else:
            batch.status, batch.completed_at = BatchStatus.COMPLETED, now
        batch.lease_until = None
        batch.save(update_fields=["status", "cancelled_at", "expired_at", "completed_at",
                                  "lease_until"])  # fmt: skip
        announce(batch_pk)


def _write_file(
    batch: Batch, runner: str, key: ApiKey, field: str, succeeded: bool, what: str
) -> None:
    """One of the batch's files, streamed from the journal through a temporary file (a batch
    may have many lines), owned by its key; none when it has no line (as OpenAI). The file is
    kept on the batch at once; one written by a runner that no longer holds it is removed."""
    outcomes = BatchOutcome.objects.filter(batch_id=batch.pk).order_by("line")
    outcomes = outcomes.filter(status_code__gte=200, status_code__lt=300) if succeeded else (
        outcomes.exclude(status_code__gte=200, status_code__lt=300)
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{what}.jsonl"
        count = 0
        with path.open("w") as out:
            for outcome in outcomes.iterator(chunk_size=2000):
                out.write(_output_line(batch, outcome) + "\n")
                count += 1
        if not count:
            return
        stored = actions.create_file_from(
            key, f"{batch.batch_id}_{what}.jsonl", FilePurpose.BATCH_OUTPUT, path, count
        )
    with transaction.atomic():
        try:
            held = _held(batch.pk, runner)
        except NotHeld:
            actions.delete_file(stored)
            raise
        setattr(held, f"{field}_id", stored.pk)
        held.save(update_fields=[f"{field}_id"])


def _output_line(batch: Batch, outcome: BatchOutcome) -> str:
    response = (
        None if outcome.status_code == 0
        else {"status_code": outcome.status_code, "request_id": outcome.request_id,
              "body": outcome.body}
    )  # fmt: skip
    error = outcome.error
    if error is None and not outcome.succeeded and isinstance(outcome.body, dict):
        found = outcome.body.get("error") or {}
        error = {"code": found.get("code"), "message": found.get("message")}
    line = {"id": f"batch_req_{batch.batch_id[6:]}_{outcome.line}",
            "custom_id": outcome.custom_id, "response": response, "error": error}  # fmt: skip
    return json.dumps(line)


def stalled(now: datetime | None = None) -> list[int]:
    """Batches with work left whose runner's hold lapsed (its worker died) or that no runner
    took yet: to run."""
    now = now or timezone.now()
    lapsed = Q(lease_until__isnull=True) | Q(lease_until__lt=now)
    return list(
        Batch.objects.filter(status__in=BATCH_RUNNING_STATES).filter(lapsed)
        .values_list("pk", flat=True)
    )  # fmt: skip


def in_use(stored: StoredFile) -> Batch | None:
    """An unfinished batch that reads this file (it may not be deleted meanwhile)."""
    return Batch.objects.filter(input_file=stored, status__in=BATCH_RUNNING_STATES).first()
