"""Base model catalog operations."""

from __future__ import annotations

import logging
from pathlib import Path

from django.conf import settings
from django.db import transaction

from studio import audit

from ..models import BaseModel

log = logging.getLogger(__name__)

SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def register_local_dir(
    name: str,
    path: Path,
    user,
    *,
    license: str = "",
    source_kind=BaseModel.Source.LOCAL_DIR,
    source: str = "",
) -> BaseModel:
    """Register (or refresh) a base model from a local Hugging Face directory."""
    from ..trainer.convert import describe_model_dir

    meta = describe_model_dir(path)
    template = ""
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.exists():
        import json

        template = json.loads(tok_cfg.read_text()).get("chat_template") or ""
    if not template and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    with transaction.atomic():
        model, created = BaseModel.objects.update_or_create(
            name=name,
            defaults={
                "source_kind": source_kind,
                "source": source or str(path),
                "path": str(path),
                "context_length": meta["context_length"],
                "parameters": meta["parameters"],
                "architecture": meta.get("architecture", ""),
                "license": license,
                "chat_template": template if isinstance(template, str) else "",
                "status": BaseModel.Status.ACTIVE,
            },
        )
        if created:
            model.created_by = user if getattr(user, "is_authenticated", False) else None
            model.save(update_fields=["created_by"])
        audit.record(
            user,
            "base_model.register" if created else "base_model.refresh",
            model,
            parameters=model.parameters,
            context_length=model.context_length,
        )
    return model


def register_gguf(name: str, gguf_path: Path, user, *, license: str = "") -> BaseModel:
    """Convert a GGUF file once to a safetensors checkpoint under the data dir, then register it."""
    from ..trainer.convert import convert_gguf_to_safetensors

    out = Path(settings.STUDIO_MODELS_DIR) / name
    convert_gguf_to_safetensors(gguf_path, out)
    return register_local_dir(
        name, out, user, license=license, source_kind=BaseModel.Source.GGUF, source=str(gguf_path)
    )


def register_bundled_smollm2(user) -> BaseModel:
    from ..trainer.convert import find_smollm2_gguf

    existing = BaseModel.objects.filter(name=SMOLLM2_NAME).first()
    if existing and existing.local_dir.joinpath("config.json").exists():
        return existing
    return register_gguf(SMOLLM2_NAME, find_smollm2_gguf(), user, license="Apache-2.0")


def set_status(model: BaseModel, status: str, user) -> None:
    with transaction.atomic():
        model.status = status
        model.save(update_fields=["status"])
        audit.record(user, f"base_model.{status}", model)
