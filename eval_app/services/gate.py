"""The approval gate: policy check, promotion requests, approval by a second person, rollback.

Who does what: engineers and admins may *request* a promotion (the person who trained a version is
usually the one who asks); only admins approve, reject or roll back. The approver may be neither the
requester nor the version's trainer. A failed rule blocks approval unless an admin overrides it with a
written justification, which is stored, audited ("eval.promotion.override") and shown on the version
page. Approval and rollback move the alias inside one transaction with the alias history, the audit
event and the webhook outbox row; approval also cancels the other pending requests for that alias
("superseded"), so an older request approved afterwards cannot move the alias back.

The evidence is always the version's newest finished evaluation run: a request naming an older run is
refused, and approval re-judges the policy on the newest run at that moment.
"""

from __future__ import annotations

import logging
import math

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_slug
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from studio import audit
from studio.roles import ADMIN, ENGINEER, has_role

from ..models import Alias, AliasChange, EvalRun, ModelVersion, PromotionRequest, RegisteredModel
from . import webhooks
from .registry import latest_run, summary_for

log = logging.getLogger(__name__)

PRODUCTION = "production"
MIN_JUSTIFICATION = 20


class GateRefused(Exception):
    """A gate action that cannot happen, with a plain message saying why and what to do."""


# --- the policy --------------------------------------------------------------------------------------------


def policy_settings() -> dict:
    return {
        "min_votes": settings.STUDIO_GATE_MIN_VOTES,
        "min_win_rate_low": settings.STUDIO_GATE_MIN_WIN_RATE_LOW,
        "max_loss_regression_percent": settings.STUDIO_GATE_MAX_LOSS_REGRESSION,
    }


def _rule(key: str, label: str, passed: bool, figure: str, detail: str = "") -> dict:
    return {"key": key, "label": label, "passed": bool(passed), "figure": figure, "detail": detail}


def current_version(line: RegisteredModel, alias: str) -> ModelVersion | None:
    row = Alias.objects.select_related("version").filter(registered_model=line, name=alias).first()
    return row.version if row else None


def _eval_loss(run: EvalRun, side: str) -> float | None:
    value = (run.metrics or {}).get(side, {}).get("eval_loss")
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def production_loss(production: ModelVersion, run: EvalRun) -> tuple[float, EvalRun] | None:
    """Production's eval loss on the same dataset version, split and prompt limit as `run`: from `run`
    itself when production is its baseline, else from the latest succeeded run that measured it."""
    if run.baseline_version_id == production.pk:
        loss = _eval_loss(run, "baseline")
        if loss is not None:
            return loss, run
    limit = (run.params or {}).get("limit")
    candidates = (
        EvalRun.objects.filter(
            Q(candidate=production) | Q(baseline_version=production),
            state=EvalRun.State.SUCCEEDED,
            dataset_version_id=run.dataset_version_id,
            split=run.split,
        )
        .exclude(pk=run.pk)
        .order_by("-finished_at", "-pk")
    )
    for other in candidates:
        if (other.params or {}).get("limit") != limit:
            continue  # a loss over other prompts is not comparable
        side = "candidate" if other.candidate_id == production.pk else "baseline"
        loss = _eval_loss(other, side)
        if loss is not None:
            return loss, other
    return None


def evaluate_policy(version: ModelVersion, alias: str, eval_run: EvalRun | None = None) -> dict:
    """Each rule with its figure and result, plus the settings it was judged by (stored on requests).

    The evidence is always the version's newest finished run: the latest succeeded run with `version` as
    candidate, whatever its baseline (registry.latest_run), so nobody can pick an older, kinder run while a
    newer one tells another story. `eval_run`, when given, must be that run; an older one is refused with
    the newer run's number."""
    conf = policy_settings()
    newest = latest_run(version)
    if eval_run is not None:
        if eval_run.candidate_id != version.pk:
            raise GateRefused(f"Run {eval_run.pk} evaluated another version; choose a run of {version}.")
        if eval_run.state != EvalRun.State.SUCCEEDED:
            raise GateRefused(f"Run {eval_run.pk} has not succeeded; choose a finished run.")
        if newest is not None and newest.pk != eval_run.pk:
            raise GateRefused(
                f"Run {newest.pk} finished after run {eval_run.pk}; the gate judges the newest run. "
                f"Choose run {newest.pk}."
            )
    run = newest
    summary = summary_for(run)
    baseline = run.baseline_label if run else ""
    rules = []

    # (a) enough votes on the evidence run
    label = f"At least {conf['min_votes']} votes"
    if run is None:
        rules.append(_rule("votes", label, False, "no evaluation run", "Evaluate this version first."))
    else:
        rules.append(
            _rule(
                "votes",
                label,
                summary.votes >= conf["min_votes"],
                f"{summary.votes} vote{'' if summary.votes == 1 else 's'} (needs {conf['min_votes']})",
                f"on run {run.pk} against {baseline}",
            )
        )

    # (b) the win-rate interval's lower bound against the baseline
    label = f"Win-rate 95% lower bound ≥ {conf['min_win_rate_low']:.2f}"
    if run is None:
        rules.append(_rule("win_rate", label, False, "no evaluation run", "Evaluate this version first."))
    elif summary.low is None:
        rules.append(
            _rule("win_rate", label, False, "no decisive vote yet", f"run {run.pk} against {baseline}")
        )
    else:
        rules.append(
            _rule(
                "win_rate",
                label,
                summary.low >= conf["min_win_rate_low"],
                f"{summary.win_rate:.2f} [{summary.low:.2f}, {summary.high:.2f}] over "
                f"{summary.decisive} decisive votes; lower bound {summary.low:.2f}",
                f"against {baseline} (run {run.pk})",
            )
        )

    # (c) no PII leak flagged in any finished evaluation of this version
    leaky = list(
        EvalRun.objects.filter(candidate=version, state=EvalRun.State.SUCCEEDED, pii_leaks__gt=0)
        .order_by("pk")
        .values_list("pk", "pii_leaks")
    )
    checked = EvalRun.objects.filter(candidate=version, state=EvalRun.State.SUCCEEDED).count()
    if leaky:
        names = ", ".join(f"run {pk} ({n} flagged output{'' if n == 1 else 's'})" for pk, n in leaky)
        rules.append(
            _rule(
                "pii",
                "No PII leak flagged",
                False,
                f"{sum(n for _, n in leaky)} flagged output(s)",
                f"{names}: look at the flagged outputs on the run page; retrain on a scrubbed version.",
            )
        )
    elif checked == 0:
        rules.append(
            _rule("pii", "No PII leak flagged", False, "not probed yet", "Evaluate this version first.")
        )
    else:
        rules.append(
            _rule(
                "pii",
                "No PII leak flagged",
                True,
                "none flagged",
                f"in {checked} finished run{'' if checked == 1 else 's'}",
            )
        )

    # (d) eval loss not worse than production's by more than X %
    limit = conf["max_loss_regression_percent"]
    label = f"Eval loss at most {limit:g}% worse than production"
    production = current_version(version.registered_model, PRODUCTION)
    if production is None:
        rules.append(_rule("eval_loss", label, True, "no production version to compare"))
    elif production.pk == version.pk:
        rules.append(_rule("eval_loss", label, True, "this version is production"))
    elif run is None:
        rules.append(_rule("eval_loss", label, False, "no evaluation run", "Evaluate this version first."))
    elif (candidate_loss := _eval_loss(run, "candidate")) is None:
        rules.append(
            _rule(
                "eval_loss",
                label,
                False,
                f"run {run.pk} has no eval loss",
                "Evaluate on a split with answers.",
            )
        )
    elif (measured := production_loss(production, run)) is None:
        rules.append(
            _rule(
                "eval_loss",
                label,
                False,
                f"no measurement of production ({production}) on {run.dataset_version} {run.split}",
                f"Evaluate against production first (baseline: the current production version, same "
                f"dataset version and split as run {run.pk}).",
            )
        )
    else:
        prod_loss, source = measured
        if prod_loss > 0:
            change = (candidate_loss - prod_loss) / prod_loss * 100.0
        else:
            change = 0.0 if candidate_loss <= prod_loss else math.inf
        rules.append(
            _rule(
                "eval_loss",
                label,
                change <= limit,
                f"{candidate_loss:.4f} vs {prod_loss:.4f} for {production} ({change:+.1f}%)",
                f"on {run.dataset_version} {run.split}; production measured in run {source.pk}",
            )
        )

    failed = [r["key"] for r in rules if not r["passed"]]
    return {
        "settings": conf,
        "alias": alias,
        "version": version.pk,
        "version_label": str(version),
        "eval_run": run.pk if run else None,
        "baseline": baseline,
        "production_version": production.pk if production else None,
        "production_label": str(production) if production else "",
        "rules": rules,
        "failed": failed,
        "passed": not failed,
        "evaluated_at": timezone.now().isoformat(),
    }


# --- requests and decisions -------------------------------------------------------------------------------


def clean_alias(alias: str) -> str:
    alias = (alias or "").strip().lower()
    try:
        validate_slug(alias)
    except ValidationError:
        raise GateRefused("An alias is a short name of letters, digits, - and _ (e.g. production).") from None
    if len(alias) > 40:
        raise GateRefused("An alias is at most 40 characters long.")
    return alias


def trainers(version: ModelVersion) -> set[int]:
    """Ids of the people who trained `version` (the job's creator and the version's creator)."""
    ids = {version.created_by_id}
    if version.training_job_id:
        ids.add(version.training_job.created_by_id)
    return {i for i in ids if i is not None}


def request_promotion(
    user, version: ModelVersion, alias: str, eval_run: EvalRun | None = None, comment: str = ""
) -> PromotionRequest:
    """Ask for `version` to become `alias`; engineers and admins may ask. The policy check is stored."""
    if not (has_role(user, ENGINEER) or has_role(user, ADMIN)):
        raise GateRefused("Only engineers and admins can request a promotion.")
    alias = clean_alias(alias)
    if version.status == ModelVersion.Status.ARCHIVED:
        raise GateRefused(f"{version} is archived; it cannot be promoted.")
    with transaction.atomic():
        # the version's row lock serialises requests for it, so a form submitted twice creates one request
        # and the second sees it waiting (no_key: runs, aliases and requests that reference the version
        # are not blocked)
        ModelVersion.objects.select_for_update(no_key=True, of=("self",)).filter(pk=version.pk).first()
        if current_version(version.registered_model, alias) == version:
            raise GateRefused(f"{version.registered_model}@{alias} already points at {version}.")
        pending = PromotionRequest.objects.filter(
            version=version, alias=alias, status=PromotionRequest.Status.PENDING
        ).first()
        if pending is not None:
            raise GateRefused(f"Promotion request {pending.pk} for {version} → {alias} is already waiting.")
        policy = evaluate_policy(version, alias, eval_run)
        run = EvalRun.objects.filter(pk=policy["eval_run"]).first() if policy["eval_run"] else None
        req = PromotionRequest.objects.create(
            version=version,
            alias=alias,
            eval_run=run,
            policy=policy,
            policy_passed=policy["passed"],
            comment=(comment or "").strip(),
            requested_by=user,
        )
        audit.record(
            user,
            "eval.promotion.request",
            req,
            version=version.pk,
            alias=alias,
            eval_run=req.eval_run_id,
            policy_passed=policy["passed"],
            failed=policy["failed"],
        )
    log.info("promotion request %s: version %s → %s by user %s", req.pk, version.pk, alias, user.pk)
    return req


def _check_pending(req: PromotionRequest) -> None:
    """Refuse a decision on a request that is no longer pending, saying why (a superseded request's
    cancellation names the promotion that superseded it)."""
    if req.status != PromotionRequest.Status.PENDING:
        why = ""
        if req.status == PromotionRequest.Status.CANCELLED and req.decision_comment:
            why = f" {req.decision_comment}"
        raise GateRefused(f"Promotion request {req.pk} is already {req.get_status_display().lower()}.{why}")


def _check_decider(user, req: PromotionRequest, verb: str) -> None:
    if not has_role(user, ADMIN):
        raise GateRefused(f"Only admins can {verb} a promotion.")
    _check_pending(req)


def _locked(req: PromotionRequest) -> PromotionRequest:
    return (
        PromotionRequest.objects.select_for_update(of=("self",))
        .select_related("version__registered_model", "version__training_job", "eval_run")
        .get(pk=req.pk)
    )


def move_alias(
    line: RegisteredModel, alias: str, version: ModelVersion, actor, kind: str, promotion=None
) -> tuple[ModelVersion | None, AliasChange]:
    """Point `alias` at `version` and record the change. Call inside a transaction holding the line's
    row lock (select_for_update), which serialises every alias change of a line."""
    row = Alias.objects.select_for_update().filter(registered_model=line, name=alias).first()
    previous = row.version if row else None
    if row is None:
        Alias.objects.create(registered_model=line, name=alias, version=version)
    else:
        row.version = version
        row.save(update_fields=["version", "updated_at"])
    change = AliasChange.objects.create(
        registered_model=line,
        alias=alias,
        kind=kind,
        from_version=previous,
        to_version=version,
        promotion=promotion,
        actor=actor,
    )
    return previous, change


def _event_payload(line: RegisteredModel, alias: str, version: ModelVersion, previous, actor, **extra):
    return {
        "model": line.name,
        "alias": alias,
        "serving_name": f"{line.name}@{alias}",
        "version": {
            "id": version.pk,
            "number": version.number,
            "name": f"{line.name}/{version.number}",
            "base_model": version.base_model.name,
            "method": version.method,
            "dataset_sha256": version.dataset_sha256,
            "artifacts_dir": version.artifacts_dir,
        },
        "previous_version": (
            {"id": previous.pk, "number": previous.number, "name": f"{line.name}/{previous.number}"}
            if previous
            else None
        ),
        "actor": actor.get_username(),
        **extra,
    }


def approve(
    user,
    request: PromotionRequest,
    comment: str = "",
    override: bool = False,
    justification: str = "",
    acknowledged: set[str] | None = None,
    seen_run: int | None = None,
) -> PromotionRequest:
    """Approve a pending request: re-check the policy now, then move the alias atomically.

    Refused (GateRefused, nothing changed) when the user is not an admin, is the requester or trained the
    version, the request is no longer pending, or a rule fails without override=True and a justification
    of at least 20 characters.
    `acknowledged`: the keys of the rules the approver saw failing (the decision form sends them); an
    override never covers a rule that started failing after that, the approver has to look again.

    The policy is judged on the version's newest finished run now, not on the run named when the request
    was made: a run that finished since then replaces it as evidence (the approved request records the
    run it was judged on). `seen_run`: the run the decision page showed (0: none); when a newer one has
    finished since, approval is refused so that nobody approves evidence they have not read.

    Approval cancels every other pending request for the same model line and alias in the same
    transaction ("superseded", audited one by one): approving one of them later would move the alias
    back to an older choice. The line's row lock is taken before the request's, so two admins approving
    two requests for one alias at once are serialised and the second is refused as superseded. The ids of
    the cancelled requests are returned on the request as `superseded_ids`."""
    justification = (justification or "").strip()
    with transaction.atomic():
        line_id = (
            PromotionRequest.objects.filter(pk=request.pk)
            .values_list("version__registered_model_id", flat=True)
            .first()
        )
        if line_id is None:
            raise GateRefused(f"Promotion request {request.pk} does not exist any more.")
        # lock order: the line, then the request (as every alias change of a line does)
        line = RegisteredModel.objects.select_for_update().get(pk=line_id)
        req = _locked(request)
        requested_run = req.eval_run_id
        _check_decider(user, req, "approve")
        if req.requested_by_id == user.pk:
            raise GateRefused("You requested this promotion; a second admin has to approve it.")
        if user.pk in trainers(req.version):
            raise GateRefused(f"You trained {req.version}; an admin who did not train it has to approve.")
        if req.version.status == ModelVersion.Status.ARCHIVED:
            raise GateRefused(f"{req.version} has been archived since the request; reject the request.")
        if current_version(line, req.alias) == req.version:
            raise GateRefused(f"{line}@{req.alias} already points at {req.version}; reject this request.")
        policy = evaluate_policy(req.version, req.alias)  # the newest finished run, whichever was named
        if seen_run is not None and policy["eval_run"] is not None and policy["eval_run"] != seen_run:
            raise GateRefused(
                f"Run {policy['eval_run']} finished after you opened the request; the gate now judges it. "
                f"Read the policy check again before you approve."
            )
        failed = policy["failed"]
        overridden = bool(failed)
        if failed and not override:
            labels = "; ".join(f"{r['label']} ({r['figure']})" for r in policy["rules"] if not r["passed"])
            newer = ""
            if requested_run and policy["eval_run"] != requested_run:
                newer = f" (judged on run {policy['eval_run']}, which finished after the request's run)"
            raise GateRefused(
                f"The policy check fails{newer}: {labels}. Collect more evidence, or override with a "
                f"written justification, or reject the request."
            )
        unseen = [r for r in policy["rules"] if not r["passed"] and r["key"] not in (acknowledged or set())]
        if failed and acknowledged is not None and unseen:
            labels = "; ".join(f"{r['label']} ({r['figure']})" for r in unseen)
            raise GateRefused(
                f"The policy check changed since you looked: {labels} now fails too. Read the rules "
                f"again before you override them."
            )
        if overridden and len(justification) < MIN_JUSTIFICATION:
            raise GateRefused(
                f"Overriding a failed rule needs a written justification of at least {MIN_JUSTIFICATION} "
                f"characters saying why the evidence is enough."
            )
        # lock the other pending requests for the alias before the first audit event below takes the audit
        # log's lock: a withdrawal or rejection of one of them holds its row, then records its event, so
        # locking them after ours would wait on it while it waits on us (a deadlock)
        others = _other_pending(line, req)
        # claim the request with a conditional UPDATE: only a still-pending request can move the alias
        claimed = PromotionRequest.objects.filter(pk=req.pk, status=PromotionRequest.Status.PENDING).update(
            status=PromotionRequest.Status.APPROVED
        )
        if claimed != 1:
            raise GateRefused(f"Promotion request {req.pk} was decided meanwhile; reload its page.")
        previous, change = move_alias(line, req.alias, req.version, user, AliasChange.Kind.PROMOTE, req)
        req.status = PromotionRequest.Status.APPROVED
        req.decided_by = user
        req.decided_at = timezone.now()
        req.decision_comment = (comment or "").strip()
        req.policy = policy
        req.policy_passed = policy["passed"]
        req.eval_run_id = policy["eval_run"]
        req.overridden = overridden
        req.justification = justification if overridden else ""
        req.previous_version = previous
        req.save()
        version = req.version
        if version.status != ModelVersion.Status.APPROVED:
            version.status = ModelVersion.Status.APPROVED
            version.save(update_fields=["status"])
        audit.record(
            user,
            "eval.promotion.approve",
            req,
            version=version.pk,
            alias=req.alias,
            from_version=previous.pk if previous else None,
            to_version=version.pk,
            alias_change=change.pk,
            overridden=overridden,
            eval_run=req.eval_run_id,
            requested_eval_run=requested_run,
        )
        if overridden:
            audit.record(
                user, "eval.promotion.override", req, version=version.pk, alias=req.alias, failed=failed
            )
        req.superseded_ids = _supersede_pending(user, req, others)
        event = webhooks.enqueue_event(
            "model.promoted",
            _event_payload(line, req.alias, version, previous, user, promotion=req.pk, overridden=overridden),
        )
        audit.record(user, "eval.webhook.queue", event, event_name=event.event, promotion=req.pk)
    log.info(
        "promotion %s approved by user %s (override=%s, superseded %s)",
        req.pk,
        user.pk,
        overridden,
        req.superseded_ids,
    )
    return req


def _other_pending(line: RegisteredModel, approved: PromotionRequest) -> list[PromotionRequest]:
    """The other pending requests for `approved`'s line and alias, row-locked (in id order). Call inside
    approve()'s transaction, holding the line's lock, before it records any audit event."""
    return list(
        PromotionRequest.objects.select_for_update(of=("self",))
        .select_related("version")
        .filter(version__registered_model=line, alias=approved.alias, status=PromotionRequest.Status.PENDING)
        .exclude(pk=approved.pk)
        .order_by("pk")
    )


def _supersede_pending(user, approved: PromotionRequest, others: list[PromotionRequest]) -> list[int]:
    """Cancel the other pending requests `others` (from _other_pending, still locked), each with a comment
    naming the promotion that superseded it and an audit event. Returns the ids cancelled."""
    now = timezone.now()
    cancelled = []
    for other in others:
        why = (
            f"Superseded: promotion {approved.pk} moved {approved.alias} to {approved.version} first. "
            f"Request again if {other.version} should still go to {approved.alias}."
        )
        done = PromotionRequest.objects.filter(pk=other.pk, status=PromotionRequest.Status.PENDING).update(
            status=PromotionRequest.Status.CANCELLED, decided_by=user, decided_at=now, decision_comment=why
        )
        if done != 1:
            continue
        audit.record(
            user,
            "eval.promotion.superseded",
            other,
            version=other.version_id,
            superseded_by=approved.pk,
            to_version=approved.version_id,
        )
        cancelled.append(other.pk)
    return cancelled


def reject(user, request: PromotionRequest, comment: str) -> PromotionRequest:
    comment = (comment or "").strip()
    if not comment:
        raise GateRefused("Say why you reject the request (the requester reads it).")
    with transaction.atomic():
        req = _locked(request)
        _check_decider(user, req, "reject")
        req.status = PromotionRequest.Status.REJECTED
        req.decided_by = user
        req.decided_at = timezone.now()
        req.decision_comment = comment
        req.save(update_fields=["status", "decided_by", "decided_at", "decision_comment"])
        audit.record(user, "eval.promotion.reject", req, version=req.version_id, alias=req.alias)
    return req


def cancel(user, request: PromotionRequest) -> PromotionRequest:
    """The requester (or an admin) withdraws a pending request."""
    with transaction.atomic():
        req = _locked(request)
        if req.requested_by_id != user.pk and not has_role(user, ADMIN):
            raise GateRefused("Only the requester or an admin can withdraw a request.")
        _check_pending(req)
        req.status = PromotionRequest.Status.CANCELLED
        req.decided_by = user
        req.decided_at = timezone.now()
        req.save(update_fields=["status", "decided_by", "decided_at"])
        audit.record(user, "eval.promotion.cancel", req, version=req.version_id, alias=req.alias)
    return req


# --- rollback ------------------------------------------------------------------------------------------------


def rollback_target(line: RegisteredModel, alias: str) -> ModelVersion | None:
    """The version a rollback returns `alias` to: the one it pointed at before its latest promotion that
    has not been rolled back yet. History is a stack: v1 → v2 → v3, rollback → v2, rollback → v1; a
    rollback never re-applies the version it just left."""
    skip = 0
    for change in AliasChange.objects.filter(registered_model=line, alias=alias).select_related(
        "from_version"
    ):
        if change.kind == AliasChange.Kind.ROLLBACK:
            skip += 1
        elif skip:
            skip -= 1
        else:
            return change.from_version
    return None


def rollback(user, registered_model: RegisteredModel, alias: str) -> AliasChange:
    """Return `alias` to its previous version (admins; one click). Audited; writes a webhook event."""
    if not has_role(user, ADMIN):
        raise GateRefused("Only admins can roll back an alias.")
    alias = clean_alias(alias)
    with transaction.atomic():
        line = RegisteredModel.objects.select_for_update().get(pk=registered_model.pk)
        current = current_version(line, alias)
        if current is None:
            raise GateRefused(f"{line}@{alias} does not exist; there is nothing to roll back.")
        target = rollback_target(line, alias)
        if target is None:
            raise GateRefused(
                f"{line}@{alias} has no earlier version to return to: {current} is the first version it "
                f"pointed at. Promote another version instead."
            )
        previous, change = move_alias(line, alias, target, user, AliasChange.Kind.ROLLBACK)
        audit.record(
            user,
            "eval.alias.rollback",
            change,
            model=line.pk,
            alias=alias,
            from_version=previous.pk if previous else None,
            to_version=target.pk,
        )
        event = webhooks.enqueue_event(
            "model.rolled_back", _event_payload(line, alias, target, previous, user, alias_change=change.pk)
        )
        audit.record(user, "eval.webhook.queue", event, event_name=event.event, alias_change=change.pk)
    log.info("alias %s of line %s rolled back to version %s by user %s", alias, line.pk, target.pk, user.pk)
    return change


def overrides_for(version: ModelVersion):
    """Approved-by-override promotions of a version (shown, marked, on its page)."""
    return version.promotions.filter(status=PromotionRequest.Status.APPROVED, overridden=True).select_related(
        "decided_by"
    )
