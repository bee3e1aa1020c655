"""The Celery app of the worker and beat processes, configured from Django settings."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from celery import Celery, signals

from controlplane import broker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

app = Celery("controlplane")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def _prepare_filesystem_broker() -> None:
    """The file-system transport expects its folders to exist before anyone sends."""
    if not str(app.conf.broker_url).startswith(f"{broker.SCHEME}://"):
        return
    for key in ("data_folder_in", "data_folder_out", "control_folder"):
        folder = app.conf.broker_transport_options.get(key)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)


@app.on_after_configure.connect
def _on_configured(sender: Celery, **kwargs: object) -> None:
    _prepare_filesystem_broker()


# Celery's line per task received, succeeded and sent by beat: every few seconds for the
# heartbeat poll and the sweep, they would bury what an operator reads (loads, unloads,
# failures, agent state changes; agents.tasks logs those). LOG_LEVEL=DEBUG shows them.
_ROUTINE_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


def _not_a_due_task(record: logging.LogRecord) -> bool:
    """Beat's own start and errors stay; its line per task sent does not."""
    return not str(record.msg).startswith("Scheduler: Sending due task")


@signals.after_setup_logger.connect
def _quiet_routine_lines(**kwargs: Any) -> None:
    from django.conf import settings

    if settings.LOG_LEVEL != "DEBUG":
        for name in _ROUTINE_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("celery.beat").addFilter(_not_a_due_task)


# Traces (controlplane.traces): a task whose message names a span continues it, in a span of
# its own. Nothing happens for the others, or while tracing is off.
@signals.task_prerun.connect
def _task_span_starts(task: Any = None, **kwargs: Any) -> None:
    from controlplane import traces

    if task is not None:
        traces.task_started(task)


@signals.task_postrun.connect
def _task_span_ends(task: Any = None, state: str | None = None, **kwargs: Any) -> None:
    from controlplane import traces

    if task is not None:
        traces.task_ended(task, state)
