"""llmfleet's control plane: the Django project."""

# Imported here so that `@shared_task` in every app binds to llmfleet's Celery app.
from controlplane.celery import app as celery_app

__all__ = ["celery_app"]
