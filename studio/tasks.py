"""Periodic housekeeping run by celery beat."""

from __future__ import annotations

import logging

from celery import shared_task

log = logging.getLogger(__name__)


@shared_task
def watchdog() -> dict:
    """Requeue imports whose worker died (stale progress), so a killed worker costs minutes, not the job."""
    from datasets_app.services.imports import requeue_stale

    requeued = requeue_stale()
    if requeued:
        log.warning("watchdog requeued uploads %s", requeued)
    return {"uploads": requeued}
