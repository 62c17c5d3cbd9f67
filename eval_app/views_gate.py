"""Approval gate pages: promotion requests, the policy check, approve / reject / override, rollback.

The list is for admins; a request's page is readable by engineers too (the requester follows it; the
lineage page links to it) but only admins see and use the decision form. Thin: every rule and every
refusal lives in eval_app.services.gate.
"""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from studio.numbers import form_id
from studio.roles import ADMIN, ENGINEER, has_role, role_required

from .models import EvalRun, ModelVersion, PromotionRequest, RegisteredModel
from .services import gate, webhooks


@role_required(ADMIN)
def promotion_list(request):
    rows = PromotionRequest.objects.select_related(
        "version__registered_model", "requested_by", "decided_by", "eval_run"
    )
    context = {
        "pending": list(rows.filter(status=PromotionRequest.Status.PENDING).order_by("created_at", "pk")),
        "history": list(rows.exclude(status=PromotionRequest.Status.PENDING).order_by("-created_at")[:100]),
        "outbox": webhooks.outbox_summary(),
    }
    return render(request, "eval/gate/promotions.html", context)


def _promotion(pk: int) -> PromotionRequest:
    return get_object_or_404(
        PromotionRequest.objects.select_related(
            "version__registered_model",
            "version__training_job",
            "requested_by",
            "decided_by",
            "eval_run",
            "previous_version",
        ),
        pk=pk,
    )


@role_required(ENGINEER)
def promotion_detail(request, pk: int):
    req = _promotion(pk)
    policy = req.policy
    live = None
    newer_run = None
    if req.status == PromotionRequest.Status.PENDING:
        try:  # what an approval would be judged by now: the newest finished run, with the votes so far
            live = gate.evaluate_policy(req.version, req.alias)
        except gate.GateRefused:
            live = None
        policy = live or policy
        if live and live["eval_run"] and live["eval_run"] != req.eval_run_id:
            newer_run = live["eval_run"]  # finished after the request was made: it is the evidence now
    user = request.user
    is_admin = has_role(user, ADMIN)
    blockers = []
    if req.requested_by_id == user.pk:
        blockers.append("You requested this promotion; a second admin has to approve it.")
    if user.pk in gate.trainers(req.version):
        blockers.append(f"You trained {req.version}; an admin who did not train it has to approve it.")
    context = {
        "req": req,
        "policy": policy,
        "live": live is not None,
        "newer_run": newer_run,
        "is_admin": is_admin,
        "can_decide": is_admin and req.status == PromotionRequest.Status.PENDING,
        "approve_blockers": blockers,
        "can_cancel": req.status == PromotionRequest.Status.PENDING
        and (is_admin or req.requested_by_id == user.pk),
        "alias_changes": list(req.alias_changes.select_related("from_version", "to_version", "actor")),
        "min_justification": gate.MIN_JUSTIFICATION,
    }
    return render(request, "eval/gate/promotion.html", context)


@role_required(ENGINEER)
@require_POST
def promotion_request(request, version_pk: int):
    version = get_object_or_404(ModelVersion.objects.select_related("registered_model"), pk=version_pk)
    run = None
    run_id = (request.POST.get("eval_run") or "").strip()
    if run_id:
        number = form_id(run_id)
        run = EvalRun.objects.filter(pk=number, candidate=version).first() if number else None
        if run is None:
            messages.error(
                request,
                "That evaluation run is not a run of this version; reload its page and request again.",
            )
            return redirect(version)
    try:
        req = gate.request_promotion(
            request.user,
            version,
            request.POST.get("alias", ""),
            eval_run=run,
            comment=request.POST.get("comment", ""),
        )
    except gate.GateRefused as exc:
        messages.error(request, str(exc))
        return redirect(version)
    if req.policy_passed:
        messages.success(
            request, f"Promotion request {req.pk} created; the policy check passes. An admin decides."
        )
    else:
        messages.warning(
            request,
            f"Promotion request {req.pk} created, but the policy check fails ({', '.join(req.policy['failed'])}).",
        )
    return redirect(req)


@role_required(ADMIN)
@require_POST
def promotion_approve(request, pk: int):
    req = _promotion(pk)
    override = request.POST.get("override") in {"1", "on", "true"}
    acknowledged = None  # the rules the decision form showed failing: an override covers only those
    if "override_seen" in request.POST:
        acknowledged = {k.strip() for k in request.POST.get("override_seen", "").split(",") if k.strip()}
    seen_run = None  # the evidence run the decision form showed: approval is refused if a newer one finished
    if "evidence_seen" in request.POST:
        seen = request.POST.get("evidence_seen", "").strip()
        seen_run = form_id(seen) if seen else 0  # empty: the page showed no finished run
        if seen_run is None:
            messages.error(
                request,
                "The decision form did not say which evaluation run it showed; nothing was approved. Reload "
                "the request's page, read the policy check and approve again.",
            )
            return redirect(req)
    requested_run = req.eval_run_id
    try:
        req = gate.approve(
            request.user,
            req,
            comment=request.POST.get("comment", ""),
            override=override,
            justification=request.POST.get("justification", ""),
            acknowledged=acknowledged,
            seen_run=seen_run,
        )
    except gate.GateRefused as exc:
        messages.error(request, str(exc))
    else:
        line = req.version.registered_model
        note = " (policy overridden; the justification is on record)" if req.overridden else ""
        if req.eval_run_id and req.eval_run_id != requested_run:
            note += f"; judged on run {req.eval_run_id}, which finished after the request was made"
        if req.superseded_ids:
            ids = ", ".join(str(pk) for pk in req.superseded_ids)
            n = len(req.superseded_ids)
            note += (
                f". Superseded and cancelled: request{'' if n == 1 else 's'} {ids} for the same alias "
                f"(the requesters can ask again)"
            )
        messages.success(request, f"{line}@{req.alias} now points at {req.version}{note}.")
    return redirect(req)


@role_required(ADMIN)
@require_POST
def promotion_reject(request, pk: int):
    req = _promotion(pk)
    try:
        gate.reject(request.user, req, request.POST.get("comment", ""))
    except gate.GateRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Promotion request {req.pk} rejected.")
    return redirect(req)


@role_required(ENGINEER)
@require_POST
def promotion_cancel(request, pk: int):
    req = _promotion(pk)
    try:
        gate.cancel(request.user, req)
    except gate.GateRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Promotion request {req.pk} withdrawn.")
    return redirect(req)


@role_required(ADMIN)
@require_POST
def alias_rollback(request, pk: int):
    line = get_object_or_404(RegisteredModel, pk=pk)
    alias = request.POST.get("alias", "")
    try:
        change = gate.rollback(request.user, line, alias)
    except gate.GateRefused as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request, f"{line}@{change.alias} rolled back from {change.from_version} to {change.to_version}."
        )
    return redirect("eval:model", line.pk)
