"""Base model catalog operations."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
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
    from ..trainer.estimate import check_model_shape

    meta = describe_model_dir(path)
    check_model_shape(json.loads((path / "config.json").read_text()))
    template = ""
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.exists():
        template = json.loads(tok_cfg.read_text()).get("chat_template") or ""
    if not template and (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    existing = BaseModel.objects.filter(name=name).values_list("status", flat=True).first()
    status = BaseModel.Status.RETIRED if existing == BaseModel.Status.RETIRED else BaseModel.Status.ACTIVE
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
                "status": status,
                "error": "",
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


# Admins retire an available model or bring a retired one back; a model being prepared or whose
# preparation failed changes only through the worker (a failed one is added again once fixed).
STATUS_CHANGES = {
    (BaseModel.Status.ACTIVE, BaseModel.Status.RETIRED),
    (BaseModel.Status.RETIRED, BaseModel.Status.ACTIVE),
}


@dataclass(frozen=True)
class StatusChange:
    """What a status change did besides the status: retiring a model cancels the jobs still queued on it
    (their pages say why) and leaves the running ones to finish."""

    cancelled_jobs: list[int] = field(default_factory=list)
    running_jobs: int = 0


def set_status(model: BaseModel, status: str, user) -> StatusChange:
    with transaction.atomic():
        # FOR NO KEY UPDATE, as create_job and claim take it: the three wait for one another, while a
        # transaction inserting a row that refers to this model (a model version, a dataset version…)
        # does not wait for us. With FOR UPDATE it would (its foreign key check takes FOR KEY SHARE), and
        # one that had recorded an audit event first would deadlock with us on the audit log's lock.
        model = BaseModel.objects.select_for_update(no_key=True).get(pk=model.pk)
        if (model.status, status) not in STATUS_CHANGES:
            raise BaseModelRefused(
                f"{model.name} is {model.get_status_display().lower()}; it cannot be made "
                f"{BaseModel.Status(status).label.lower()} from there."
            )
        if status == BaseModel.Status.ACTIVE and not (model.local_dir / "config.json").is_file():
            raise BaseModelRefused(
                f"{model.name}'s files are missing at {model.local_dir}; restore them before reactivating it."
            )
        model.status = status
        model.save(update_fields=["status"])
        change = StatusChange()
        if status == BaseModel.Status.RETIRED:
            from .jobs import cancel_queued_on_base

            cancelled, running = cancel_queued_on_base(model, user)
            change = StatusChange(cancelled_jobs=cancelled, running_jobs=running)
            audit.record(user, f"base_model.{status}", model, cancelled_jobs=cancelled, running_jobs=running)
        else:
            audit.record(user, f"base_model.{status}", model)
    return change


class BaseModelRefused(Exception):
    """The base model cannot be added as asked; the message says what to do instead."""


def check_name(name: str) -> None:
    """A base model's name is also its folder under the models dir: no path parts, no spaces."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name or "") or ".." in name:
        raise BaseModelRefused("Name: use letters, digits, dots, hyphens and underscores (max 100).")


def _is_file(path: Path) -> bool:
    """`path.is_file()`, False for a path the file system cannot even look up (a name too long…)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _has_weights(path: Path) -> bool:
    try:
        return any(path.glob("*.safetensors"))
    except (OSError, ValueError):
        return False


def check_local_dir(path: Path) -> None:
    if not path.is_absolute() or not _is_file(path / "config.json"):
        raise BaseModelRefused(
            f"Source: {path} is not a Hugging Face model directory on this server (an absolute path "
            "holding config.json, safetensors weights and the tokenizer)."
        )
    if not _has_weights(path):
        raise BaseModelRefused(f"Source: {path} holds no .safetensors weights.")


def add_base_model(name: str, kind: str, source: str, user, *, license: str = "") -> BaseModel:
    """Admin UI: a local directory registers at once; a GGUF file (converted once) or a hub id (only
    where a hub or mirror is reachable) is prepared by a worker and becomes available when done."""
    import re

    name, source = name.strip(), source.strip()
    check_name(name)
    if BaseModel.objects.filter(name=name).exists():
        raise BaseModelRefused(f"Name: a base model called {name} already exists.")
    if kind == BaseModel.Source.LOCAL_DIR:
        path = Path(source)
        check_local_dir(path)
        try:
            return register_local_dir(name, path, user, license=license)
        except Exception as exc:  # unreadable config/weights: say which, keep nothing half-written
            raise BaseModelRefused(f"Source: {source} could not be read as a model ({exc}).")
    if kind == BaseModel.Source.GGUF:
        path = Path(source)
        if not path.is_absolute() or path.suffix.lower() != ".gguf" or not _is_file(path):
            raise BaseModelRefused(
                f"Source: {source} is not a .gguf file on this server (use an absolute path)."
            )
    elif kind == BaseModel.Source.HUB:
        if not settings.STUDIO_HUB_ENABLED:
            raise BaseModelRefused(
                "This studio does not reach a model hub (STUDIO_HUB_ENABLED is off). Download the model "
                "where a hub is reachable, copy its directory to this server and add it as a local directory."
            )
        if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", source):
            raise BaseModelRefused("Source: a hub id looks like organisation/model-name.")
    else:
        raise BaseModelRefused(f"Source kind “{kind}” is unknown.")
    with transaction.atomic():
        model = BaseModel.objects.create(
            name=name,
            source_kind=kind,
            source=source,
            license=license,
            status=BaseModel.Status.PREPARING,
            created_by=user if getattr(user, "is_authenticated", False) else None,
        )
        audit.record(user, "base_model.add", model, kind=kind)
        from ..tasks import prepare_base_model

        transaction.on_commit(lambda: prepare_base_model.delay(model.pk))
    return model


def prepare(model: BaseModel) -> BaseModel:
    """Worker side of add_base_model: convert or fetch into the models dir, then register; a failure
    leaves the row marked failed with the reason (and nothing half-written in the models dir)."""
    out = Path(settings.STUDIO_MODELS_DIR) / model.name
    try:
        if model.source_kind == BaseModel.Source.GGUF:
            return register_gguf(model.name, Path(model.source), model.created_by, license=model.license)
        from huggingface_hub import snapshot_download

        tmp = out.with_name(f".{out.name}.download")
        snapshot_download(model.source, local_dir=str(tmp))
        tmp.replace(out)
        return register_local_dir(
            model.name, out, model.created_by, license=model.license, source_kind=model.source_kind,
            source=model.source,
        )  # fmt: skip
    except Exception as exc:
        log.exception("base model %s could not be prepared", model.pk)
        BaseModel.objects.filter(pk=model.pk).update(status=BaseModel.Status.FAILED, error=str(exc)[:2000])
        audit.record(None, "base_model.fail", model)
        model.refresh_from_db()
        return model
