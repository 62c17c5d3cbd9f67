"""Registry operations (evaluation, votes and the approval gate build on these)."""

from __future__ import annotations

from django.db import transaction
from django.db.models import Count, Max, Q

from studio import audit

from ..models import Alias, AliasChange, EvalRun, ModelVersion, RegisteredModel


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


# --- names ---------------------------------------------------------------------------------------------


def resolve_model_name(name: str) -> ModelVersion:
    """The version a serving name points at: "<line>@<alias>" (e.g. support@production) or
    "<line>/<number>" (e.g. support/3). Raises ValueError for a malformed name and
    ModelVersion.DoesNotExist when the line, alias or version does not exist."""
    name = (name or "").strip()
    if "@" in name:
        line, _, alias = name.partition("@")
        if not line or not alias or "@" in alias or "/" in alias:
            raise ValueError(f"{name!r} is not a model name: use <line>@<alias> or <line>/<version>")
        row = (
            Alias.objects.select_related("version__registered_model", "version__base_model")
            .filter(registered_model__name=line, name=alias)
            .first()
        )
        if row is None:
            raise ModelVersion.DoesNotExist(f"no alias {alias!r} on model line {line!r}")
        return row.version
    if "/" in name:
        line, _, number = name.rpartition("/")
        if not line or not (number.isascii() and number.isdigit()):
            raise ValueError(f"{name!r} is not a model name: use <line>@<alias> or <line>/<version>")
        try:
            return ModelVersion.objects.select_related("registered_model", "base_model").get(
                registered_model__name=line, number=int(number)
            )
        except ModelVersion.DoesNotExist:
            raise ModelVersion.DoesNotExist(f"no version {number} of model line {line!r}") from None
    raise ValueError(f"{name!r} is not a model name: use <line>@<alias> or <line>/<version>")


def serving_names(version: ModelVersion) -> list[str]:
    """Every name that currently serves `version`: its aliases and its number."""
    line = version.registered_model.name
    names = [f"{line}@{a.name}" for a in version.aliases.all()]
    return [*names, f"{line}/{version.number}"]


# --- reading the registry --------------------------------------------------------------------------------


def latest_run(version: ModelVersion):
    """The version's latest succeeded evaluation run as candidate (the default evidence), or None."""
    return (
        EvalRun.objects.filter(candidate=version, state=EvalRun.State.SUCCEEDED)
        .select_related("baseline_version__registered_model", "baseline_base_model", "dataset_version")
        .order_by("-finished_at", "-pk")
        .first()
    )


def summary_for(run):
    """The run's vote summary (eval_app.stats.run_summary), or None without a run."""
    if run is None:
        return None
    from ..stats import run_summary

    return run_summary(run)


def alias_history(line: RegisteredModel, limit: int = 100) -> list[AliasChange]:
    return list(
        line.alias_changes.select_related(
            "from_version", "to_version", "actor", "promotion", "registered_model"
        )[:limit]
    )


def lineage(version: ModelVersion) -> dict:
    """Dataset version → training job → model version → evaluation runs (with vote counts) →
    promotions → alias changes, as plain objects for the lineage page."""
    runs = list(
        EvalRun.objects.filter(Q(candidate=version) | Q(baseline_version=version))
        .select_related(
            "candidate__registered_model", "baseline_version__registered_model", "dataset_version"
        )
        .annotate(vote_count=Count("comparisons__votes"))
        .order_by("-created_at", "-pk")
    )
    promotions = list(
        version.promotions.select_related("requested_by", "decided_by", "eval_run").order_by("-created_at")
    )
    changes = list(
        AliasChange.objects.filter(Q(to_version=version) | Q(from_version=version))
        .select_related("from_version", "to_version", "actor", "promotion", "registered_model")
        .order_by("-created_at", "-pk")
    )
    return {
        "dataset_version": version.dataset_version,
        "training_job": version.training_job,
        "version": version,
        "runs": runs,
        "promotions": promotions,
        "alias_changes": changes,
    }
