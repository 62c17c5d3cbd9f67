"""Model registry: named model lines, their versions and aliases (evaluation and the gate build on these)."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models
from django.urls import NoReverseMatch, reverse


class RegisteredModel(models.Model):
    """A named line of models, e.g. "support-assistant"."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    class Status(models.TextChoices):
        CANDIDATE = "candidate", "Candidate"
        APPROVED = "approved", "Approved"
        ARCHIVED = "archived", "Archived"

    registered_model = models.ForeignKey(RegisteredModel, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    base_model = models.ForeignKey("training_app.BaseModel", on_delete=models.PROTECT, related_name="+")
    training_job = models.OneToOneField(
        "training_app.TrainingJob",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="model_version",
    )
    dataset_version = models.ForeignKey(
        "datasets_app.DatasetVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    dataset_sha256 = models.CharField(max_length=64, blank=True)
    method = models.CharField(max_length=8, blank=True)
    config = models.JSONField(default=dict)
    metrics = models.JSONField(default=dict)
    artifacts_dir = models.CharField(max_length=500, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.CANDIDATE)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["registered_model", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["registered_model", "number"], name="model_version_number")
        ]

    def __str__(self) -> str:
        return f"{self.registered_model.name}/{self.number}"

    def get_absolute_url(self) -> str:
        try:
            return reverse("eval:version", args=[self.pk])
        except NoReverseMatch:  # registry pages come with the evaluation issue
            return self.training_job.get_absolute_url() if self.training_job_id else ""

    @property
    def artifacts_path(self) -> Path:
        return Path(self.artifacts_dir)


class Alias(models.Model):
    """A movable name ("staging", "production", …) pointing at one version of a model line."""

    registered_model = models.ForeignKey(RegisteredModel, on_delete=models.CASCADE, related_name="aliases")
    name = models.SlugField(max_length=40)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="aliases")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["registered_model", "name"]
        constraints = [models.UniqueConstraint(fields=["registered_model", "name"], name="alias_unique")]

    def __str__(self) -> str:
        return f"{self.registered_model.name}@{self.name}"
