"""The approval gate, two defects reproduced:

1. Two pending requests for one alias could both be approved, so approving the older one afterwards moved
   the alias back to an older version. Approving a request now cancels every other pending request for
   the same model line and alias ("superseded", audited), and a request that is no longer pending cannot
   be approved.
2. The requester chose the evaluation run the policy is judged on, so an old favourable run could be
   picked while a newer finished run of the same version failed. The gate now judges the version's newest
   finished run: a request naming an older run is refused, and approval re-judges on the newest run.

The model line, versions, runs and votes come from `World` in test_gate.py.
"""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone
from test_gate import World, rule, verbs
from test_gate import world as world  # noqa: F401 - the fixture

from eval_app.models import Alias, AliasChange, EvalRun, PromotionRequest, WebhookEvent
from eval_app.services import gate
from studio.audit import verify_chain
from studio.models import AuditEvent

pytestmark = pytest.mark.django_db

PENDING, APPROVED, CANCELLED = (
    PromotionRequest.Status.PENDING,
    PromotionRequest.Status.APPROVED,
    PromotionRequest.Status.CANCELLED,
)


def finished_ago(run: EvalRun, hours: int) -> EvalRun:
    run.finished_at = timezone.now() - timedelta(hours=hours)
    run.save(update_fields=["finished_at"])
    return run


def production(world: World):
    return Alias.objects.get(registered_model=world.line, name="production").version


# =====================================================================================================
# Defect 1: one approval per alias; the other pending requests are superseded
# =====================================================================================================


def test_approval_cancels_the_other_pending_requests_for_that_alias_only(world):
    v1, v2, v3 = world.version(), world.version(), world.version()
    for v in (v1, v2, v3):
        world.good_run(v)
    r1 = gate.request_promotion(world.requester, v1, "production")
    r2 = gate.request_promotion(world.requester, v2, "production")
    staging = gate.request_promotion(world.requester, v1, "staging")  # another alias: untouched

    approved = gate.approve(world.approver, r2)

    assert approved.status == APPROVED and approved.superseded_ids == [r1.pk]
    assert production(world) == v2
    r1.refresh_from_db()
    staging.refresh_from_db()
    assert r1.status == CANCELLED and staging.status == PENDING
    assert r1.decided_by == world.approver and r1.decided_at is not None
    assert r1.decision_comment == (
        f"Superseded: promotion {r2.pk} moved production to support/2 first. "
        f"Request again if support/1 should still go to production."
    )
    event = AuditEvent.objects.get(verb="eval.promotion.superseded")
    assert event.object_id == str(r1.pk) and event.actor == world.approver
    assert event.data == {"version": v1.pk, "superseded_by": r2.pk, "to_version": v2.pk}
    assert [v for v in verbs() if v.startswith("eval.promotion.")] == [
        "eval.promotion.request",
        "eval.promotion.request",
        "eval.promotion.request",
        "eval.promotion.approve",
        "eval.promotion.superseded",
    ]
    assert verify_chain().ok


def test_each_superseded_request_gets_its_own_audit_event(world):
    versions = [world.version() for _ in range(4)]
    for v in versions:
        world.good_run(v)
    requests = [gate.request_promotion(world.requester, v, "production") for v in versions]

    gate.approve(world.approver, requests[1])

    others = [requests[0], requests[2], requests[3]]
    assert set(PromotionRequest.objects.filter(status=CANCELLED).values_list("pk", flat=True)) == {
        r.pk for r in others
    }
    events = AuditEvent.objects.filter(verb="eval.promotion.superseded").order_by("id")
    assert [int(e.object_id) for e in events] == [r.pk for r in others]
    assert {e.data["superseded_by"] for e in events} == {requests[1].pk}


def test_approving_the_older_request_afterwards_is_refused_and_production_stays(world):
    """The defect: request A (v1), then request B (v2); B is approved; approving A then moved production
    back to v1. A is now superseded, and its approval is refused with the reason."""
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.good_run(v2)
    older = gate.request_promotion(world.requester, v1, "production")
    newer = gate.request_promotion(world.requester, v2, "production")
    gate.approve(world.approver, newer)

    with pytest.raises(gate.GateRefused) as refused:
        gate.approve(world.approver, older)  # `older` in memory still says "pending"
    assert str(refused.value) == (
        f"Promotion request {older.pk} is already cancelled. Superseded: promotion {newer.pk} moved "
        f"production to support/2 first. Request again if support/1 should still go to production."
    )
    assert production(world) == v2
    assert AliasChange.objects.count() == 1 and WebhookEvent.objects.count() == 1
    assert AuditEvent.objects.filter(verb="eval.promotion.approve").count() == 1
    # rejecting or withdrawing it is refused too: it is already decided
    with pytest.raises(gate.GateRefused, match="already cancelled"):
        gate.reject(world.approver, older, "no longer needed")
    with pytest.raises(gate.GateRefused, match="already cancelled"):
        gate.cancel(world.requester, older)
    # the requester may ask again; the new request is an ordinary pending one
    again = gate.request_promotion(world.requester, v1, "production")
    assert again.status == PENDING and again.pk != older.pk


def test_withdrawn_and_rejected_requests_cannot_be_approved(world):
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.good_run(v2)
    withdrawn = gate.request_promotion(world.requester, v1, "production")
    rejected = gate.request_promotion(world.requester, v2, "production")
    gate.cancel(world.requester, withdrawn)
    gate.reject(world.approver, rejected, "Wait for the refund fix.")
    with pytest.raises(gate.GateRefused, match=f"Promotion request {withdrawn.pk} is already cancelled."):
        gate.approve(world.approver, withdrawn)
    with pytest.raises(gate.GateRefused, match=f"Promotion request {rejected.pk} is already rejected."):
        gate.approve(world.approver, rejected)
    assert not Alias.objects.exists() and not AliasChange.objects.exists()


def test_a_refused_approval_cancels_nothing(world):
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.run(v2, wins=5)  # too few votes
    other = gate.request_promotion(world.requester, v1, "production")
    weak = gate.request_promotion(world.requester, v2, "production")
    with pytest.raises(gate.GateRefused, match="The policy check fails"):
        gate.approve(world.approver, weak)
    other.refresh_from_db()
    assert other.status == PENDING and other.decision_comment == ""
    assert not AuditEvent.objects.filter(verb="eval.promotion.superseded").exists()


def test_superseded_request_page_shows_the_reason_and_no_decision_form(world, client_for):
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.good_run(v2)
    older = gate.request_promotion(world.requester, v1, "production")
    newer = gate.request_promotion(world.requester, v2, "production")
    gate.approve(world.approver, newer)
    url = reverse("eval:promotion", args=[older.pk])
    for user in (world.requester, world.approver):
        page = client_for(user).get(url).content.decode()
        assert "Cancelled" in page and "<dt>Reason</dt>" in page
        assert f"Superseded: promotion {newer.pk} moved production to support/2 first." in page
        assert "Request again if support/1 should still go to production." in page
        assert "Approve and move the alias" not in page and "Withdraw the request" not in page


def test_approval_through_the_ui_names_the_superseded_requests(world, client_for):
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.good_run(v2)
    older = gate.request_promotion(world.requester, v1, "production")
    newer = gate.request_promotion(world.requester, v2, "production")
    admin = client_for(world.approver)
    page = admin.post(reverse("eval:promotion_approve", args=[newer.pk]), follow=True).content.decode()
    assert "now points at support/2" in page
    assert f"Superseded and cancelled: request {older.pk} for the same alias" in page
    # the stale page of the older request: approving it now shows the reason instead of moving the alias
    page = admin.post(reverse("eval:promotion_approve", args=[older.pk]), follow=True).content.decode()
    assert f"Promotion request {older.pk} is already cancelled. Superseded: promotion {newer.pk}" in page
    assert production(world) == v2


# =====================================================================================================
# Defect 2: the evidence is the version's newest finished run
# =====================================================================================================


def test_request_naming_an_older_run_is_refused_with_the_newer_run(world):
    v = world.version()
    favourable = finished_ago(world.good_run(v), hours=48)
    newest = world.run(v, wins=16, losses=14)  # same comparison, finished later: the win rate fails
    with pytest.raises(gate.GateRefused) as refused:
        gate.request_promotion(world.requester, v, "production", eval_run=favourable)
    assert str(refused.value) == (
        f"Run {newest.pk} finished after run {favourable.pk}; the gate judges the newest run. "
        f"Choose run {newest.pk}."
    )
    assert not PromotionRequest.objects.exists()
    assert "eval.promotion.request" not in verbs()
    req = gate.request_promotion(world.requester, v, "production", eval_run=newest)
    assert req.eval_run == newest and req.policy["failed"] == ["win_rate"]


def test_an_older_run_against_another_baseline_is_refused_too(world):
    """Cherry-picking across comparisons: an old run against the base model looks good, the newer run
    against production loses. Every finished run of the version is evidence, whatever its baseline."""
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.promote(v1)
    against_base = finished_ago(world.good_run(v2), hours=24)
    against_production = world.run(v2, baseline=v1, wins=10, losses=20)
    with pytest.raises(gate.GateRefused, match=f"Choose run {against_production.pk}"):
        gate.request_promotion(world.requester, v2, "production", eval_run=against_base)
    assert not PromotionRequest.objects.filter(version=v2).exists()


def test_request_without_a_run_is_judged_on_the_newest_one(world):
    v = world.version()
    finished_ago(world.good_run(v), hours=48)
    newest = world.run(v, wins=16, losses=14)
    world.run(v, wins=40, state=EvalRun.State.RUNNING)  # not finished: not evidence
    req = gate.request_promotion(world.requester, v, "production")
    assert req.eval_run == newest and req.policy["eval_run"] == newest.pk
    assert f"against {newest.baseline_label} (run {newest.pk})" == rule(req.policy, "win_rate")["detail"]


def test_version_page_form_with_an_older_run_shows_the_refusal(world, client_for):
    v = world.version()
    favourable = finished_ago(world.good_run(v), hours=48)
    newest = world.run(v, wins=16, losses=14)
    response = client_for(world.requester).post(
        reverse("eval:promotion_request", args=[v.pk]),
        {"alias": "production", "eval_run": favourable.pk},
        follow=True,
    )
    page = response.content.decode()
    assert f"Run {newest.pk} finished after run {favourable.pk}; the gate judges the newest run." in page
    assert "Traceback" not in page and not PromotionRequest.objects.exists()


def test_version_page_offers_the_newest_run_only_and_names_it(world, client_for):
    v = world.version()
    older = finished_ago(world.good_run(v), hours=48)
    newest = world.run(v, wins=16, losses=14)
    page = client_for(world.requester).get(reverse("eval:version", args=[v.pk])).content.decode()
    assert '<select id="eval_run"' not in page  # no choice of evidence any more
    assert f'<input type="hidden" name="eval_run" value="{newest.pk}">' in page
    assert f"run {newest.pk}</a> against" in page and f"Latest run's votes (run {newest.pk})" in page
    assert f'name="eval_run" value="{older.pk}"' not in page


def test_promote_command_with_an_older_run_exits_non_zero(world):
    v = world.version()
    favourable = finished_ago(world.good_run(v), hours=48)
    newest = world.run(v, wins=16, losses=14)
    with pytest.raises(CommandError, match=f"Choose run {newest.pk}"):
        call_command("promote", str(v.pk), "--by", "rita", "--run", str(favourable.pk), stdout=StringIO())
    assert not PromotionRequest.objects.exists()


def test_approval_is_judged_on_a_run_that_finished_after_the_request(world):
    """A request made on a good run; a newer run of the version then loses. Approval judges the newer run:
    refused without an override, and the request keeps waiting."""
    v = world.version()
    good = world.good_run(v)
    req = gate.request_promotion(world.requester, v, "production")
    assert req.eval_run == good and req.policy_passed
    losing = world.run(v, wins=16, losses=14)
    with pytest.raises(gate.GateRefused) as refused:
        gate.approve(world.approver, req)
    assert str(refused.value).startswith(
        f"The policy check fails (judged on run {losing.pk}, which finished after the request's run): "
        f"Win-rate 95% lower bound"
    )
    req.refresh_from_db()
    assert req.status == PENDING and req.eval_run == good and not Alias.objects.exists()
    # an override is judged (and recorded) on the newer run too
    why = "Accepted: the losses are all on a retired product the team no longer supports."
    req = gate.approve(world.approver, req, override=True, justification=why)
    assert req.status == APPROVED and req.overridden and req.eval_run == losing
    assert req.policy["eval_run"] == losing.pk and req.policy["failed"] == ["win_rate"]
    event = AuditEvent.objects.get(verb="eval.promotion.approve")
    assert event.data["eval_run"] == losing.pk and event.data["requested_eval_run"] == good.pk


def test_approval_on_a_newer_passing_run_needs_no_override(world):
    v = world.version()
    world.run(v, wins=16, losses=14)
    req = gate.request_promotion(world.requester, v, "production")
    assert not req.policy_passed
    better = world.good_run(v)
    req = gate.approve(world.approver, req)
    assert req.policy_passed and not req.overridden and req.eval_run == better
    assert production(world) == v


def test_promotion_page_names_the_newer_run_and_judges_it(world, client_for):
    v = world.version()
    good = world.good_run(v)
    req = gate.request_promotion(world.requester, v, "production")
    losing = world.run(v, wins=16, losses=14)
    page = client_for(world.approver).get(reverse("eval:promotion", args=[req.pk])).content.decode()
    assert f'data-newer-run="{losing.pk}"' in page
    assert f"Run {losing.pk} finished after this request was made on run {good.pk}." in page
    assert f"Judged on evaluation run {losing.pk}" in page and "0.53 [0.36, 0.70]" in page
    assert f'name="evidence_seen" value="{losing.pk}"' in page
    assert "Approve with override" in page


def test_approval_from_a_page_loaded_before_a_newer_run_finished_is_refused(world, client_for):
    v = world.version()
    good = world.good_run(v)
    req = gate.request_promotion(world.requester, v, "production")
    admin = client_for(world.approver)
    page = admin.get(reverse("eval:promotion", args=[req.pk])).content.decode()
    assert f'name="evidence_seen" value="{good.pk}"' in page and "data-newer-run" not in page
    newer = world.good_run(v)  # finishes while the admin reads the page
    url = reverse("eval:promotion_approve", args=[req.pk])
    page = admin.post(url, {"evidence_seen": str(good.pk)}, follow=True).content.decode()
    assert f"Run {newer.pk} finished after you opened the request" in page
    req.refresh_from_db()
    assert req.status == PENDING and not Alias.objects.exists()
    page = admin.post(url, {"evidence_seen": str(newer.pk)}, follow=True).content.decode()
    assert "now points at support/1" in page
    assert "judged on run" in page and f"run {newer.pk}" in page
    req.refresh_from_db()
    assert req.status == APPROVED and req.eval_run == newer
