"""Base models available for fine-tuning (the training jobs themselves come with the training issue)."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.db import models


class BaseModel(models.Model):
    class Source(models.TextChoices):
        LOCAL_DIR = "local_dir", "Local Hugging Face directory"
        GGUF = "gguf", "GGUF file (converted once to safetensors)"
        HUB = "hub", "Hub id (only where a hub or mirror is reachable)"

    class Status(models.TextChoices):
        ACTIVE = "active", "Available"
        RETIRED = "retired", "Retired"
        PREPARING = "preparing", "Preparing"  # a worker converts the GGUF file / fetches from the hub
        FAILED = "failed", "Failed to prepare"

    name = models.CharField(max_length=100, unique=True)
    source_kind = models.CharField(max_length=16, choices=Source.choices)
    source = models.CharField(max_length=500, help_text="Directory, GGUF file path or hub id")
    path = models.CharField(
        max_length=500, blank=True, help_text="Local safetensors directory used at run time"
    )
    context_length = models.PositiveIntegerField(default=0)
    parameters = models.BigIntegerField(default=0)
    license = models.CharField(max_length=100, blank=True)
    chat_template = models.TextField(blank=True)
    architecture = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def local_dir(self) -> Path:
        return Path(self.path or self.source)

    @property
    def parameters_label(self) -> str:
        if self.parameters >= 1e9:
            return f"{self.parameters / 1e9:.1f}B"
        return f"{self.parameters / 1e6:.0f}M"


class ComputeNode(models.Model):
    """A worker process on queue "gpu" and the devices it reported (one row per worker hostname)."""

    hostname = models.CharField(max_length=200, unique=True)
    devices = models.JSONField(default=list)  # [{"name", "kind", "total_bytes", "label"}]
    last_seen = models.DateTimeField()

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return self.hostname


class TrainingJob(models.Model):
    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    class Method(models.TextChoices):
        SFT = "sft", "Full fine-tune (SFT)"
        LORA = "lora", "LoRA"
        QLORA = "qlora", "QLoRA (4-bit NF4)"
        DPO = "dpo", "DPO (preference pairs)"

    ACTIVE_STATES = (State.QUEUED, State.RUNNING)
    FINAL_STATES = (State.SUCCEEDED, State.FAILED, State.CANCELLED)

    dataset_version = models.ForeignKey(
        "datasets_app.DatasetVersion", on_delete=models.PROTECT, related_name="training_jobs"
    )
    replay_version = models.ForeignKey(
        "datasets_app.DatasetVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    replay_percent = models.FloatField(default=0)
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="training_jobs")
    method = models.CharField(max_length=8, choices=Method.choices)
    preset = models.CharField(max_length=40, blank=True)
    model_name = models.CharField(max_length=100, help_text="Registry line the result is added to")
    config = models.JSONField(default=dict)  # the trainer's hyperparameters (TrainConfig fields)
    estimate = models.JSONField(default=dict)  # tokens, steps, memory at launch
    merge_requested = models.BooleanField(default=False)

    class Merge(models.TextChoices):  # a merge asked for after the job succeeded (the job page's button)
        NONE = "", "Not asked"
        PENDING = "pending", "Merging"
        DONE = "done", "Merged"
        FAILED = "failed", "Merge failed"

    merge_state = models.CharField(max_length=8, choices=Merge.choices, default=Merge.NONE, blank=True)
    merge_error = models.TextField(blank=True)

    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED, db_index=True)
    priority = models.IntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    attempt = models.PositiveIntegerField(default=0)
    claim_token = models.CharField(max_length=32, blank=True)
    worker = models.CharField(max_length=200, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    cancel_requested = models.BooleanField(default=False)

    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    attempt_started_step = models.PositiveIntegerField(default=0)
    attempt_started_at = models.DateTimeField(null=True, blank=True)
    tokens_per_second = models.FloatField(default=0)
    device = models.CharField(max_length=100, blank=True)
    last_checkpoint = models.CharField(max_length=500, blank=True)
    checkpoint_step = models.PositiveIntegerField(default=0)
    log_tail = models.JSONField(default=list)
    final_metrics = models.JSONField(default=dict)
    artifacts_dir = models.CharField(max_length=500, blank=True)

    error_code = models.CharField(max_length=40, blank=True)
    error_message = models.TextField(blank=True)
    error_suggestion = models.TextField(blank=True)
    error_traceback = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state", "-priority", "queued_at"])]

    def __str__(self) -> str:
        return f"job {self.pk}"

    def get_absolute_url(self) -> str:
        from django.urls import reverse

        return reverse("training:job", args=[self.pk])

    @property
    def output_dir(self) -> Path:
        return Path(settings.DATA_DIR) / "jobs" / str(self.pk)

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    @property
    def progress_percent(self) -> float:
        return 100.0 * self.step / self.total_steps if self.total_steps else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Remaining time from this attempt's pace (steps done since it started)."""
        if self.state != self.State.RUNNING or not self.attempt_started_at or not self.total_steps:
            return None
        from django.utils import timezone

        done = self.step - self.attempt_started_step
        if done <= 0:
            return None
        elapsed = (timezone.now() - self.attempt_started_at).total_seconds()
        return max(0.0, elapsed / done * (self.total_steps - self.step))


class TrainingMetric(models.Model):
    """One value per (job, step, name): train loss, eval loss, learning rate, tokens/s…"""

    job = models.ForeignKey(TrainingJob, on_delete=models.CASCADE, related_name="metrics")
    step = models.PositiveIntegerField()
    name = models.CharField(max_length=40)
    value = models.FloatField()
    attempt = models.PositiveIntegerField(default=1)

    class Meta:
        ordering = ["job", "step", "name"]
        constraints = [models.UniqueConstraint(fields=["job", "step", "name"], name="metric_once_per_step")]

    def __str__(self) -> str:
        return f"{self.name}@{self.step}={self.value:g}"
