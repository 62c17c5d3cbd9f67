"""Periodic housekeeping run by celery beat."""

from __future__ import annotations

import logging

from celery import shared_task

log = logging.getLogger(__name__)


@shared_task
def watchdog() -> dict:
    """Requeue imports, PII scans, training jobs and evaluation runs whose worker died (a lost worker costs
    minutes)."""
    from datasets_app.services.imports import requeue_stale
    from datasets_app.services.scrub import requeue_stale_scans
    from eval_app.services.evaluation import requeue_stale as requeue_stale_evals
    from training_app.services.jobs import requeue_stale as requeue_stale_jobs

    report = {}
    for name, rescue in (
        ("uploads", requeue_stale),
        ("scans", requeue_stale_scans),
        ("jobs", requeue_stale_jobs),
        ("evals", requeue_stale_evals),
    ):
        try:  # one kind's trouble (the database or broker briefly away) must not stop the others
            report[name] = rescue()
        except Exception:
            log.exception("watchdog: rescuing %s failed this round; the next round tries again", name)
            report[name] = None
    if report.get("uploads"):
        log.warning("watchdog requeued uploads %s", report["uploads"])
    return report
