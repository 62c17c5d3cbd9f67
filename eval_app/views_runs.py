"""Evaluation-run pages (engineers and admins: they name the models, so reviewers never see them) and
the canary registry (curators and admins). Thin: parse, authorise, call a service, render."""

from __future__ import annotations

from django.contrib import messages
from django.core.paginator import Paginator
from django.db import transaction
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from studio import audit
from studio.htmx import render_htmx
from studio.numbers import form_id
from studio.roles import CURATOR, ENGINEER, REVIEWER, has_role, role_required

from . import stats
from .forms import CanaryForm, EvalRunForm
from .models import Canary, Comparison, EvalRun, Generation, ModelVersion
from .services import evaluation, voting

SAMPLE_SIZE = 20


def _runs():
    return EvalRun.objects.select_related(
        "candidate__registered_model",
        "baseline_version__registered_model",
        "baseline_base_model",
        "dataset_version__dataset",
        "created_by",
    )


@role_required(ENGINEER)
def runs(request):
    rows = list(_runs()[:200])
    context = {"runs": rows, "any_active": any(r.is_active for r in rows)}
    return render_htmx(request, "eval/runs/list.html", "eval/runs/partials/run_table.html", context)


@role_required(ENGINEER)
def run_new(request):
    if request.method == "POST":
        form = EvalRunForm(request.POST)
        if form.is_valid():
            data = form.cleaned_data
            try:
                run = evaluation.create_run(
                    request.user,
                    data["candidate"],
                    data["baseline_kind"],
                    data["dataset_version"],
                    split=data["split"],
                    baseline_version=data.get("baseline_version"),
                    **form.params(),
                )
            except evaluation.EvalRefused as exc:
                for problem in exc.problems:
                    form.add_error(None, problem)
            else:
                messages.success(request, f"Evaluation run {run.pk} queued.")
                return redirect(run)
    else:
        initial = {}
        version_id = form_id(request.GET.get("version", ""))  # a garbled id preselects nothing
        if version_id is not None:
            version = ModelVersion.objects.filter(pk=version_id).select_related("dataset_version").first()
            if version is not None:
                initial["candidate"] = version.pk
                if version.dataset_version_id:
                    initial["dataset_version"] = version.dataset_version_id
        form = EvalRunForm(initial=initial)
    return render(request, "eval/runs/new.html", {"form": form, "probe_count": len(evaluation.PROBE_PROMPTS)})


def _flagged_rows(run: EvalRun) -> list[dict]:
    canaries = dict(Canary.objects.values_list("pk", "label"))
    rows = []
    for g in run.generations.filter(side=Generation.Side.CANDIDATE, flagged=True).order_by(
        "kind", "position"
    ):
        leaking = [e for e in g.pii_entities if not e.get("echo")]
        rows.append(
            {
                "generation": g,
                "types": sorted({e["type"] for e in leaking if e["type"] != "CANARY"}),
                "canaries": [canaries.get(pk) or f"canary {pk}" for pk in g.canary_hits],
                "segments": evaluation.masked_segments(g.output, g.pii_entities),
                "question": _last_user_turn(g.prompt),
            }
        )
    return rows


def _last_user_turn(prompt: list[dict]) -> str:
    for message in reversed(prompt or []):
        if message.get("role") == "user":
            return message.get("content", "")
    return ""


def _sample(run: EvalRun, page: str | None):
    comparisons = Comparison.objects.filter(run=run).select_related(
        "candidate_generation", "baseline_generation"
    )
    sample = Paginator(comparisons.order_by("position"), SAMPLE_SIZE).get_page(page)
    for c in sample:
        c.question = _last_user_turn(c.candidate_generation.prompt)
        c.candidate_segments = evaluation.masked_segments(
            c.candidate_generation.output, c.candidate_generation.pii_entities
        )
        c.baseline_segments = evaluation.masked_segments(
            c.baseline_generation.output, c.baseline_generation.pii_entities
        )
    return sample


METRIC_ROWS = [
    ("eval_loss", "Eval loss (reference answers)", "lower"),
    ("perplexity", "Perplexity", "lower"),
    ("exact_match", "Exact match", "higher"),
    ("contains", "Contains the reference", "higher"),
    ("tokens_per_second", "Generation tokens/s", ""),
]
LENGTH_ROWS = [
    ("tokens", "mean"),
    ("tokens", "median"),
    ("tokens", "p90"),
    ("chars", "mean"),
    ("chars", "p90"),
]


def _metric_table(run: EvalRun) -> list[dict]:
    candidate, baseline = run.metrics.get("candidate") or {}, run.metrics.get("baseline") or {}
    rows = []
    for key, label, better in METRIC_ROWS:
        rows.append(
            _metric_row(
                label,
                candidate.get(key),
                baseline.get(key),
                better,
                percent=key in ("exact_match", "contains"),
            )
        )
    for unit, stat in LENGTH_ROWS:
        c = ((candidate.get("answer_length") or {}).get(unit) or {}).get(stat)
        b = ((baseline.get("answer_length") or {}).get(unit) or {}).get(stat)
        rows.append(_metric_row(f"Answer length, {unit} ({stat})", c, b, ""))
    return rows


def _metric_row(label, c, b, better, percent=False) -> dict:
    delta = c - b if isinstance(c, int | float) and isinstance(b, int | float) else None
    tone = ""
    if delta and better:
        tone = "good" if (delta < 0) == (better == "lower") else "bad"
    return {
        "label": label,
        "candidate_text": _fmt(c, percent),
        "baseline_text": _fmt(b, percent),
        "delta_text": _fmt(delta, percent, signed=True),
        "tone": tone,
    }


def _fmt(value, percent=False, signed=False) -> str:
    if not isinstance(value, int | float):
        return "—"
    if percent:
        return f"{value * 100:+.1f} pts" if signed else f"{value * 100:.1f}%"
    text = f"{value:+.4g}" if signed else f"{value:.4g}"
    return text


def _vote_summary(run: EvalRun):
    return stats.run_summary(run) if run.comparisons.exists() else None


def _detail_context(request, run: EvalRun) -> dict:
    finished = run.state == EvalRun.State.SUCCEEDED
    return {
        "run": run,
        "manageable": evaluation.can_manage(run, request.user),
        "metric_rows": _metric_table(run) if finished else [],
        "flagged": _flagged_rows(run) if finished else [],
        "sample": _sample(run, request.GET.get("page")) if finished else None,
        "summary": _vote_summary(run) if finished else None,
    }


def _run(pk: int) -> EvalRun:
    return get_object_or_404(_runs(), pk=pk)


@role_required(ENGINEER)
def run_detail(request, pk: int):
    run = _run(pk)
    context = _detail_context(request, run)
    if context["sample"] is not None and context["sample"].paginator.count:
        # the sample and the flagged outputs say which answer is whose: no blind votes on it from here on
        voting.mark_unblinded(run, request.user)
        context["unblinded_note"] = has_role(request.user, REVIEWER) and voting.exclusions_on()
    return render(request, "eval/runs/detail.html", context)


@role_required(ENGINEER)
def run_live(request, pk: int):
    """HTMX: the status card while the run is active (the full page reloads once it has finished)."""
    run = _run(pk)
    response = render(
        request,
        "eval/runs/partials/run_status.html",
        {"run": run, "manageable": evaluation.can_manage(run, request.user)},
    )
    if not run.is_active and request.GET.get("was") == "active":
        response["HX-Refresh"] = "true"  # metrics, leaks and the sample appear with the finished state
    return response


@role_required(ENGINEER)
@require_POST
def run_cancel(request, pk: int):
    run = _run(pk)
    try:
        run = evaluation.cancel_run(run, request.user)
    except evaluation.EvalRefused as exc:
        messages.error(request, str(exc))
    else:
        if run.state == EvalRun.State.CANCELLED:
            messages.success(request, f"Evaluation run {run.pk} cancelled.")
        else:
            messages.success(request, f"Evaluation run {run.pk} stops after its current batch.")
    return redirect(run)


# --- canaries --------------------------------------------------------------------------------------


@role_required(CURATOR)
def canaries(request):
    form = CanaryForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        with transaction.atomic():
            canary = form.save(commit=False)
            canary.created_by = request.user
            canary.save()
            audit.record(request.user, "eval.canary.create", canary)
        messages.success(request, f"Canary “{canary}” registered; every new evaluation run scans for it.")
        return redirect("eval:canaries")
    rows = Canary.objects.select_related("created_by").order_by("-active", "-created_at")
    return render(request, "eval/runs/canaries.html", {"form": form, "canaries": rows})


@role_required(CURATOR)
@require_POST
def canary_deactivate(request, pk: int):
    canary = get_object_or_404(Canary, pk=pk)
    with transaction.atomic():
        if Canary.objects.filter(pk=pk, active=True).update(active=False):
            audit.record(request.user, "eval.canary.deactivate", canary)
            messages.success(request, f"Canary “{canary}” deactivated; new runs no longer scan for it.")
        else:
            messages.error(request, "That canary is already inactive.")
    return redirect("eval:canaries")
