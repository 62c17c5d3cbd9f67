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

    name = models.CharField(max_length=100, unique=True)
    source_kind = models.CharField(max_length=16, choices=Source.choices)
    source = models.CharField(max_length=500, help_text="Directory, GGUF file path or hub id")
    path = models.CharField(
        max_length=500, blank=True, help_text="Local safetensors directory used at run time"
    )
    context_length = models.PositiveIntegerField()
    parameters = models.BigIntegerField(default=0)
    license = models.CharField(max_length=100, blank=True)
    chat_template = models.TextField(blank=True)
    architecture = models.CharField(max_length=100, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
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
