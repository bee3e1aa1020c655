"""The gateway's Celery tasks: thin, as agents.tasks are; the work is in batchrun."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from controlplane.gateway import actions, batchactions, batchrun

log = logging.getLogger(__name__)


@shared_task(name="gateway.tasks.run_batch")
def run_batch(batch_pk: int) -> None:
    """Run a batch to its end (the `batches` queue: a batch holds its thread for its run)."""
    batchrun.run(batch_pk)


@shared_task(name="gateway.tasks.resume_batches")
def resume_batches() -> None:
    """Batches whose runner stopped renewing its hold (a worker killed, a restart): run again,
    from the journal."""
    # A message no batcher took within a hold's time expires: while the batchers are busy, a
    # batch waiting its turn is not queued again every few seconds.
    for batch_pk in batchactions.stalled():
        run_batch.apply_async((batch_pk,), expires=settings.BATCH_LEASE_SECONDS)


@shared_task(name="gateway.tasks.prune_history")
def prune_history() -> None:
    """Beat's hourly pruning of per-minute request figures and daily usage past their retention."""
    pruned = actions.prune_history()
    if any(pruned.values()):
        log.info("pruned %s", ", ".join(f"{n} {what}" for what, n in pruned.items()))
