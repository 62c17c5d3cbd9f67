"""Model registry pages: model lines, a line's versions and alias history, a version, its lineage.

Engineers and admins only (reviewers must not learn which model produced which answer; curators have no
business here). Thin: read through eval_app.services.registry / gate, render.
"""

from __future__ import annotations

from django.db.models import Count
from django.shortcuts import get_object_or_404, render
from django.urls import reverse

from studio.roles import ADMIN, ENGINEER, has_role, role_required

from .models import Alias, EvalRun, ModelVersion, PromotionRequest, RegisteredModel
from .services import gate, registry
from .stats import leaderboard


def _with_summary(run: EvalRun | None):
    if run is not None:
        run.summary = registry.summary_for(run)
    return run


@role_required(ENGINEER)
def model_list(request):
    lines = list(RegisteredModel.objects.annotate(version_count=Count("versions")).order_by("name"))
    aliases = Alias.objects.select_related("version").order_by("name")
    by_line: dict[int, list] = {}
    for alias in aliases:
        by_line.setdefault(alias.registered_model_id, []).append(alias)
    for line in lines:
        line.alias_rows = by_line.get(line.pk, [])
        line.latest = line.versions.order_by("-number").first()
        line.latest_run = _with_summary(registry.latest_run(line.latest)) if line.latest else None
        line.production = next((a.version for a in line.alias_rows if a.name == gate.PRODUCTION), None)
        line.production_run = (
            _with_summary(registry.latest_run(line.production))
            if line.production and line.production != line.latest
            else None
        )
    return render(request, "eval/registry/models.html", {"lines": lines})


@role_required(ENGINEER)
def model_detail(request, pk: int):
    line = get_object_or_404(RegisteredModel, pk=pk)
    versions = list(
        line.versions.select_related("dataset_version__dataset", "training_job", "created_by", "base_model")
        .prefetch_related("aliases")
        .order_by("-number")
    )
    for version in versions:
        version.latest_run = _with_summary(registry.latest_run(version))
    aliases = list(line.aliases.select_related("version").order_by("name"))
    for alias in aliases:
        alias.rollback_to = gate.rollback_target(line, alias.name)
    context = {
        "line": line,
        "versions": versions,
        "aliases": aliases,
        "history": registry.alias_history(line),
        "leaderboard": leaderboard(line),
        "is_admin": has_role(request.user, ADMIN),
        "pending": line_pending(line),
    }
    return render(request, "eval/registry/model.html", context)


def line_pending(line: RegisteredModel):
    return PromotionRequest.objects.filter(
        version__registered_model=line, status=PromotionRequest.Status.PENDING
    ).select_related("version", "requested_by")


def _version(pk: int) -> ModelVersion:
    return get_object_or_404(
        ModelVersion.objects.select_related(
            "registered_model",
            "base_model",
            "training_job__created_by",
            "dataset_version__dataset",
            "created_by",
        ),
        pk=pk,
    )


@role_required(ENGINEER)
def version_detail(request, pk: int):
    version = _version(pk)
    runs = list(
        EvalRun.objects.filter(candidate=version)
        .select_related(
            "baseline_version__registered_model", "baseline_base_model", "dataset_version__dataset"
        )
        .order_by("-created_at", "-pk")
    )
    for run in runs:
        run.summary = registry.summary_for(run) if run.state == EvalRun.State.SUCCEEDED else None
    finished = [r for r in runs if r.state == EvalRun.State.SUCCEEDED]
    alias = (request.GET.get("alias") or gate.PRODUCTION).strip()
    try:
        preview = gate.evaluate_policy(version, gate.clean_alias(alias))
    except gate.GateRefused:
        alias, preview = gate.PRODUCTION, gate.evaluate_policy(version, gate.PRODUCTION)
    context = {
        "version": version,
        "aliases": list(version.aliases.order_by("name")),
        "serving_names": registry.serving_names(version),
        "runs": runs,
        "finished_runs": finished,
        # the run the gate judges (the newest finished one): the request form sends it, so a run that
        # finishes while the engineer reads the page makes the request refused, not silently re-based
        "evidence": next((r for r in finished if r.pk == preview["eval_run"]), None),
        "promotions": list(
            version.promotions.select_related("requested_by", "decided_by", "eval_run").order_by(
                "-created_at"
            )
        ),
        "overrides": list(gate.overrides_for(version)),
        "preview": preview,
        "preview_alias": alias,
        "can_request": has_role(request.user, ENGINEER) and version.status != ModelVersion.Status.ARCHIVED,
        "evaluate_url": f"{reverse('eval:run_new')}?version={version.pk}",
        "job_url": version.training_job.get_absolute_url() if version.training_job_id else "",
    }
    return render(request, "eval/registry/version.html", context)


@role_required(ENGINEER)
def version_lineage(request, pk: int):
    version = _version(pk)
    data = registry.lineage(version)
    for run in data["runs"]:
        run.role = "candidate" if run.candidate_id == version.pk else "baseline"
    return render(request, "eval/registry/lineage.html", {"version": version, **data})
