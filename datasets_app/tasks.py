"""Celery tasks (queue "curation"): thin wrappers around the services. Arguments are ids only,
so no message text ever passes through the broker.

A scan stopped by the dataset's own settings (``scrub.ScanStopped``: a keep-pattern that runs out of
time) ends the task normally: the service recorded the failure (shown on the dataset page) and cleared
the progress, and raising would only log a traceback; the watchdog does not requeue it either."""

from __future__ import annotations

import logging

from celery import shared_task
from django.contrib.auth import get_user_model

from .models import Dataset
from .services import duplicates, imports, progress, scrub

log = logging.getLogger(__name__)


@shared_task(acks_late=True, reject_on_worker_lost=True)
def process_upload(upload_id: int) -> None:
    result = imports.process(upload_id)
    if result is not None and result.imported:
        analyse_dataset.delay(result.upload.dataset_id, result.upload.uploaded_by_id)


@shared_task(acks_late=True, reject_on_worker_lost=True)
def analyse_dataset(dataset_id: int, user_id: int | None = None, scrub_all: bool = False) -> None:
    """After an import: duplicate groups, then the PII scan of unscanned examples."""
    dataset = Dataset.objects.get(pk=dataset_id)
    progress.set_progress("scan", dataset_id, "Finding duplicates", 0, 1)
    duplicates.recompute(dataset)
    unscanned = dataset.examples.filter(pii_status="unscanned").values_list("pk", flat=True)
    try:
        scrub.scan_examples(dataset, list(unscanned), on_progress=scrub.scan_progress_callback(dataset_id))
    except scrub.ScanStopped:
        return  # recorded and shown on the dataset page; nothing is scrubbed after an incomplete scan
    if scrub_all:
        user = get_user_model().objects.filter(pk=user_id).first()
        scrub.apply_all(dataset, user)
    progress.clear_progress("scan", dataset_id)


@shared_task(acks_late=True, reject_on_worker_lost=True)
def scan_examples(dataset_id: int, example_ids: list[int] | None = None) -> None:
    dataset = Dataset.objects.get(pk=dataset_id)
    try:
        scrub.scan_examples(dataset, example_ids, on_progress=scrub.scan_progress_callback(dataset_id))
    except scrub.ScanStopped:
        return  # recorded and shown on the dataset page; a retry would stop the same way
    progress.clear_progress("scan", dataset_id)
