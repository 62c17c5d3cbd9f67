"""Registry operations (evaluation, votes and the approval gate build on these)."""

from __future__ import annotations

from django.db import transaction
from django.db.models import Max

from studio import audit

from ..models import ModelVersion, RegisteredModel


def register_job_result(job) -> ModelVersion:
    """A succeeded training job becomes a candidate version of its model line, with its lineage."""
    with transaction.atomic():
        line, created = RegisteredModel.objects.get_or_create(
            name=job.model_name, defaults={"created_by": job.created_by}
        )
        if created:
            audit.record(job.created_by, "registry.model.create", line)
        line = RegisteredModel.objects.select_for_update().get(pk=line.pk)
        number = (line.versions.aggregate(m=Max("number"))["m"] or 0) + 1
        version = ModelVersion.objects.create(
            registered_model=line,
            number=number,
            base_model=job.base_model,
            training_job=job,
            dataset_version=job.dataset_version,
            dataset_sha256=job.dataset_version.sha256,
            method=job.method,
            config=job.config,
            metrics=job.final_metrics,
            artifacts_dir=job.artifacts_dir,
            created_by=job.created_by,
        )
        audit.record(
            job.created_by,
            "registry.version.create",
            version,
            job=job.pk,
            dataset_version=job.dataset_version_id,
            dataset_sha256=job.dataset_version.sha256,
        )
    return version
