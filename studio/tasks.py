"""Periodic housekeeping run by celery beat."""

from __future__ import annotations

import logging

from celery import shared_task

log = logging.getLogger(__name__)


@shared_task
def watchdog() -> dict:
    """Requeue imports and training jobs whose worker died, so a killed worker costs minutes, not the job."""
    from datasets_app.services.imports import requeue_stale
    from training_app.services.jobs import requeue_stale as requeue_stale_jobs

    requeued = requeue_stale()
    if requeued:
        log.warning("watchdog requeued uploads %s", requeued)
    return {"uploads": requeued, "jobs": requeue_stale_jobs()}
