"""Thin Celery wrappers (queue "gpu"): the job state lives in the database, see services.jobs."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.signals import worker_ready

from .services import jobs

log = logging.getLogger(__name__)


@shared_task(acks_late=True)
def run_next() -> int | None:
    """Claim the highest-priority queued job and run one attempt of it."""
    job = jobs.claim_next(jobs.hostname())
    if job is None:
        return None
    log.info("training job %s attempt %s starting", job.pk, job.attempt)
    job = jobs.run_claimed(job)
    log.info("training job %s attempt %s ended %s", job.pk, job.attempt, job.state)
    return job.pk


@shared_task(acks_late=True)
def merge_job(job_id: int) -> None:
    from .models import TrainingJob

    jobs.merge(TrainingJob.objects.get(pk=job_id))


@shared_task(acks_late=True)
def prepare_base_model(model_id: int) -> str:
    from .models import BaseModel
    from .services.base_models import prepare

    return prepare(BaseModel.objects.get(pk=model_id)).status


@worker_ready.connect
def _report_devices(sender=None, **kwargs) -> None:
    """gpu workers tell the studio which devices they hold (engineers see them on the job form)."""
    task_consumer = getattr(sender, "task_consumer", None)
    queues = {q.name for q in getattr(task_consumer, "queues", None) or []}
    if queues and "gpu" not in queues:
        return
    try:
        from .trainer.estimate import available_devices

        jobs.report_devices(getattr(sender, "hostname", None) or jobs.hostname(), available_devices())
    except Exception:  # a worker must start even if the database is briefly unavailable
        log.exception("could not report this worker's devices")
