"""The approval gate: each policy rule blocking alone, separation of duties, the override path, approval
moving the alias atomically (with history, audit and a webhook event), rollback, the role matrix on the
gate's pages and actions, and `manage.py promote`.

Votes are written straight into the database by `World` below (EvalRun → Generation → Comparison →
Vote), so these tests do not depend on the evaluation or voting services.
"""

from __future__ import annotations

import threading
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from datasets_app.models import Dataset, DatasetVersion
from eval_app.models import (
    Alias,
    AliasChange,
    Comparison,
    EvalRun,
    Generation,
    ModelVersion,
    PromotionRequest,
    RegisteredModel,
    Vote,
    WebhookEvent,
)
from eval_app.services import gate, webhooks
from studio.audit import verify_chain
from studio.models import AuditEvent
from studio.roles import ADMIN, ENGINEER, REVIEWER
from training_app.models import BaseModel, TrainingJob

# =====================================================================================================
# A small factory: a model line, versions, and evaluation runs with votes built directly in the DB
# =====================================================================================================


class World:
    """A model line "support" on a tiny base model, a frozen dataset version, people in every role."""

    def __init__(self, make_user, curator):
        self.curator = curator
        self.trainer = make_user("tess", ENGINEER)  # trains every version made here
        self.requester = make_user("rita", ENGINEER)  # asks for promotions
        self.approver = make_user("abe", ADMIN)  # a second person: neither requester nor trainer
        self.voter = make_user("vic", REVIEWER)
        self.base = BaseModel.objects.create(
            name="tiny-base", source_kind="local_dir", source="/nonexistent", context_length=512
        )
        dataset = Dataset.objects.create(name="support-chats", kind="sft", owner=curator)
        self.data = DatasetVersion.objects.create(
            dataset=dataset, number=1, kind="sft", sha256="5" * 64, counts={"golden": 40}, created_by=curator
        )
        self.line = RegisteredModel.objects.create(name="support", created_by=self.trainer)

    def version(self, *, trainer=None, with_job=True, **fields) -> ModelVersion:
        trainer = trainer or self.trainer
        number = self.line.versions.count() + 1
        job = None
        if with_job:
            job = TrainingJob.objects.create(
                dataset_version=self.data,
                base_model=self.base,
                method="lora",
                model_name=self.line.name,
                created_by=trainer,
                state=TrainingJob.State.SUCCEEDED,
            )
        return ModelVersion.objects.create(
            registered_model=self.line,
            number=number,
            base_model=self.base,
            training_job=job,
            dataset_version=self.data,
            dataset_sha256=self.data.sha256,
            method="lora",
            config={"lora_r": 8, "learning_rate": 0.0002},
            metrics={"train_loss": 1.25},
            artifacts_dir=f"/artifacts/{number}",
            created_by=trainer,
        )

    def run(
        self,
        version,
        *,
        baseline=None,
        wins=0,
        losses=0,
        ties=0,
        both_bad=0,
        loss=1.0,
        baseline_loss=1.0,
        pii_leaks=0,
        split="golden",
        state=EvalRun.State.SUCCEEDED,
    ) -> EvalRun:
        run = EvalRun.objects.create(
            candidate=version,
            baseline_kind=EvalRun.BaselineKind.VERSION if baseline else EvalRun.BaselineKind.BASE,
            baseline_version=baseline,
            baseline_base_model=self.base,
            dataset_version=self.data,
            split=split,
            state=state,
            metrics={"candidate": {"eval_loss": loss}, "baseline": {"eval_loss": baseline_loss}},
            pii_leaks=pii_leaks,
            finished_at=timezone.now() if state == EvalRun.State.SUCCEEDED else None,
            created_by=self.trainer,
        )
        outcomes = ["candidate"] * wins + ["baseline"] * losses + ["tie"] * ties + ["both_bad"] * both_bad
        gens = Generation.objects.bulk_create(
            Generation(
                run=run, side=side, position=i, prompt=[{"role": "user", "content": f"q{i}"}], output="a"
            )
            for i in range(len(outcomes))
            for side in ("candidate", "baseline")
        )
        comparisons = Comparison.objects.bulk_create(
            Comparison(
                run=run,
                position=i,
                candidate_generation=gens[2 * i],
                baseline_generation=gens[2 * i + 1],
                swapped=False,
                votes_count=1,
            )
            for i in range(len(outcomes))
        )
        choice = {"candidate": "a", "baseline": "b", "tie": "tie", "both_bad": "both_bad"}
        Vote.objects.bulk_create(
            Vote(comparison=c, reviewer=self.voter, choice=choice[o], outcome=o)
            for c, o in zip(comparisons, outcomes, strict=True)
        )
        return run

    def good_run(self, version, **kw) -> EvalRun:
        """Evidence that passes every rule: 30 votes, all wins (lower bound 0.89), equal loss, no PII."""
        kw.setdefault("wins", 30)
        return self.run(version, **kw)

    def promote(self, version, alias="production") -> PromotionRequest:
        """Through the real gate: request by the requester, approval by the approver."""
        req = gate.request_promotion(self.requester, version, alias)
        return gate.approve(self.approver, req, override=not req.policy_passed, justification="x" * 30)


@pytest.fixture
def world(make_user, curator):
    return World(make_user, curator)


def rule(policy, key):
    return next(r for r in policy["rules"] if r["key"] == key)


def verbs():
    return list(AuditEvent.objects.order_by("id").values_list("verb", flat=True))


pytestmark = pytest.mark.django_db


# =====================================================================================================
# Each rule blocking alone
# =====================================================================================================


def test_good_evidence_passes_every_rule(world):
    v = world.version()
    run = world.good_run(v)
    policy = gate.evaluate_policy(v, "production")
    assert policy["passed"] and policy["failed"] == []
    assert policy["eval_run"] == run.pk
    assert rule(policy, "votes")["figure"] == "30 votes (needs 30)"
    assert "lower bound 0.89" in rule(policy, "win_rate")["figure"]
    assert rule(policy, "eval_loss")["figure"] == "no production version to compare"
    assert policy["settings"] == {
        "min_votes": 30,
        "min_win_rate_low": 0.5,
        "max_loss_regression_percent": 5.0,
    }


def test_too_few_votes_blocks_alone(world):
    v = world.version()
    world.run(v, wins=29)  # 29/29 wins: interval [0.88, 1], but one vote short
    policy = gate.evaluate_policy(v, "production")
    assert policy["failed"] == ["votes"]
    assert rule(policy, "votes")["figure"] == "29 votes (needs 30)"


def test_votes_threshold_follows_the_setting(world, settings):
    settings.STUDIO_GATE_MIN_VOTES = 10
    v = world.version()
    world.run(v, wins=12)
    policy = gate.evaluate_policy(v, "production")
    assert policy["passed"]
    assert policy["settings"]["min_votes"] == 10


def test_win_rate_lower_bound_blocks_alone(world):
    v = world.version()
    world.run(v, wins=16, losses=14)  # 0.53, Wilson [0.36, 0.70]
    policy = gate.evaluate_policy(v, "production")
    assert policy["failed"] == ["win_rate"]
    figure = rule(policy, "win_rate")["figure"]
    assert figure.startswith("0.53 [0.36, 0.70]") and "lower bound 0.36" in figure


def test_both_bad_votes_count_as_votes_but_not_in_the_win_rate(world):
    v = world.version()
    world.run(v, wins=20, both_bad=10)
    policy = gate.evaluate_policy(v, "production")
    assert rule(policy, "votes")["passed"]
    assert "over 20 decisive votes" in rule(policy, "win_rate")["figure"]


def test_pii_leak_blocks_alone_and_names_the_run(world):
    v = world.version()
    world.good_run(v)
    leaky = world.run(v, pii_leaks=2)  # an older run flagged two outputs
    leaky.finished_at = timezone.now() - timezone.timedelta(days=1)
    leaky.save()
    policy = gate.evaluate_policy(v, "production")
    assert policy["failed"] == ["pii"]
    assert f"run {leaky.pk} (2 flagged outputs)" in rule(policy, "pii")["detail"]


def test_failed_runs_do_not_count_as_evidence(world):
    v = world.version()
    world.run(v, wins=40, state=EvalRun.State.FAILED)
    policy = gate.evaluate_policy(v, "production")
    assert policy["eval_run"] is None
    assert set(policy["failed"]) == {"votes", "win_rate", "pii"}
    assert rule(policy, "votes")["detail"] == "Evaluate this version first."


def test_eval_loss_regression_against_production_blocks_alone(world):
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.promote(v1)
    world.good_run(v2, baseline=v1, loss=1.10, baseline_loss=1.0)  # 10% worse than production
    policy = gate.evaluate_policy(v2, "production")
    assert policy["failed"] == ["eval_loss"]
    assert rule(policy, "eval_loss")["figure"] == "1.1000 vs 1.0000 for support/1 (+10.0%)"


def test_eval_loss_within_the_allowed_regression_passes(world):
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.promote(v1)
    world.good_run(v2, baseline=v1, loss=1.04, baseline_loss=1.0)
    assert gate.evaluate_policy(v2, "production")["passed"]


def test_production_without_comparable_measurement_says_evaluate_against_production(world):
    v1, v2 = world.version(), world.version()
    world.good_run(v1, split="eval")  # production measured, but on another split
    world.promote(v1)
    world.good_run(v2)  # against the base model, on golden
    policy = gate.evaluate_policy(v2, "production")
    assert policy["failed"] == ["eval_loss"]
    assert "Evaluate against production first" in rule(policy, "eval_loss")["detail"]


def test_production_loss_is_taken_from_another_run_on_the_same_data(world):
    v1, v2 = world.version(), world.version()
    world.good_run(v1, loss=2.0)  # production as candidate: 2.0 on golden
    world.promote(v1)
    world.good_run(v2, loss=2.2)  # against the base model: 10% worse than 2.0
    policy = gate.evaluate_policy(v2, "production")
    assert policy["failed"] == ["eval_loss"]
    assert "(+10.0%)" in rule(policy, "eval_loss")["figure"]


def test_evidence_run_must_be_a_finished_run_of_the_version(world):
    v1, v2 = world.version(), world.version()
    other = world.good_run(v1)
    with pytest.raises(gate.GateRefused, match="evaluated another version"):
        gate.evaluate_policy(v2, "production", other)
    running = world.run(v2, state=EvalRun.State.RUNNING)
    with pytest.raises(gate.GateRefused, match="has not succeeded"):
        gate.evaluate_policy(v2, "production", running)


# =====================================================================================================
# Requests, separation of duties, override
# =====================================================================================================


def test_request_stores_the_policy_snapshot_and_is_audited(world):
    v = world.version()
    run = world.good_run(v)
    req = gate.request_promotion(world.requester, v, "Production", comment="ready")
    assert req.alias == "production" and req.status == PromotionRequest.Status.PENDING
    assert req.eval_run == run and req.policy_passed
    assert req.policy["settings"]["min_votes"] == 30 and len(req.policy["rules"]) == 4
    event = AuditEvent.objects.get(verb="eval.promotion.request")
    assert event.object_id == str(req.pk) and event.data["policy_passed"] is True


def test_reviewers_cannot_request_and_duplicates_are_refused(world):
    v = world.version()
    with pytest.raises(gate.GateRefused, match="Only engineers and admins"):
        gate.request_promotion(world.voter, v, "production")
    first = gate.request_promotion(world.requester, v, "production")
    with pytest.raises(gate.GateRefused, match=f"request {first.pk}"):
        gate.request_promotion(world.requester, v, "production")
    with pytest.raises(gate.GateRefused, match="letters, digits"):
        gate.request_promotion(world.requester, v, "prod uction!")


def test_requester_cannot_approve_their_own_request(world, make_user):
    v = world.version()
    world.good_run(v)
    admin_requester = make_user("ann", ADMIN)
    req = gate.request_promotion(admin_requester, v, "production")
    with pytest.raises(gate.GateRefused, match="You requested this promotion"):
        gate.approve(admin_requester, req)
    assert not Alias.objects.exists()
    assert PromotionRequest.objects.get(pk=req.pk).status == PromotionRequest.Status.PENDING


def test_trainer_cannot_approve_even_as_admin(world, make_user):
    admin_trainer = make_user("tom", ADMIN)
    v = world.version(trainer=admin_trainer)
    world.good_run(v)
    req = gate.request_promotion(world.requester, v, "production")
    with pytest.raises(gate.GateRefused, match="You trained support/1"):
        gate.approve(admin_trainer, req)
    # a version registered without a job: its creator is the trainer
    v2 = world.version(trainer=admin_trainer, with_job=False)
    world.good_run(v2)
    req2 = gate.request_promotion(world.requester, v2, "staging")
    with pytest.raises(gate.GateRefused, match="You trained"):
        gate.approve(admin_trainer, req2)
    assert not Alias.objects.exists()


def test_engineers_cannot_approve(world):
    v = world.version()
    world.good_run(v)
    req = gate.request_promotion(world.requester, v, "production")
    other_engineer = world.trainer  # an engineer, and the trainer: refused for the role first
    with pytest.raises(gate.GateRefused, match="Only admins can approve"):
        gate.approve(other_engineer, req)


def test_approval_moves_the_alias_with_history_audit_and_webhook_event(world):
    v = world.version()
    world.good_run(v)
    req = gate.request_promotion(world.requester, v, "production")
    req = gate.approve(world.approver, req, comment="looks good")
    v.refresh_from_db()
    assert req.status == PromotionRequest.Status.APPROVED and req.decided_by == world.approver
    assert req.previous_version is None and not req.overridden
    assert v.status == ModelVersion.Status.APPROVED
    assert Alias.objects.get(registered_model=world.line, name="production").version == v
    change = AliasChange.objects.get()
    assert (change.kind, change.from_version, change.to_version, change.promotion) == (
        "promote",
        None,
        v,
        req,
    )
    event = WebhookEvent.objects.get()
    assert event.event == "model.promoted"
    assert event.payload["serving_name"] == "support@production"
    assert event.payload["version"]["name"] == "support/1" and event.payload["promotion"] == req.pk
    assert webhooks.verify_signature(webhooks.secret(), event.body, event.signature)
    assert [v for v in verbs() if v.startswith("eval.")] == [
        "eval.promotion.request",
        "eval.promotion.approve",
        "eval.webhook.queue",
    ]
    assert verify_chain().ok


def test_failed_rule_blocks_approval_without_override(world):
    v = world.version()
    world.run(v, wins=5)
    req = gate.request_promotion(world.requester, v, "production")
    assert not req.policy_passed
    with pytest.raises(gate.GateRefused, match="The policy check fails: At least 30 votes"):
        gate.approve(world.approver, req)
    with pytest.raises(gate.GateRefused, match="at least 20 characters"):
        gate.approve(world.approver, req, override=True, justification="because")
    assert not Alias.objects.exists() and not WebhookEvent.objects.exists()
    assert not AuditEvent.objects.filter(verb__startswith="eval.promotion.approve").exists()


def test_override_with_justification_is_stored_audited_and_shown(world, client_for):
    v = world.version()
    world.run(v, wins=5)
    req = gate.request_promotion(world.requester, v, "production")
    why = "Hotfix for the refund bug; only 5 votes but all wins, full evaluation follows Monday."
    req = gate.approve(world.approver, req, override=True, justification=why)
    assert req.overridden and req.justification == why
    assert Alias.objects.get(name="production").version == v
    override = AuditEvent.objects.get(verb="eval.promotion.override")
    assert override.data["failed"] == ["votes"]
    assert override.actor == world.approver and override.object_id == str(req.pk)
    assert AuditEvent.objects.get(verb="eval.promotion.approve").data["overridden"] is True
    assert WebhookEvent.objects.get().payload["overridden"] is True
    page = client_for(world.requester).get(reverse("eval:version", args=[v.pk])).content.decode()
    assert "promoted by override" in page and "Hotfix for the refund bug" in page
    assert "votes" in page


def test_policy_is_re_evaluated_at_approval(world):
    v = world.version()
    req = gate.request_promotion(world.requester, v, "production")  # no evidence yet
    assert set(req.policy["failed"]) == {"votes", "win_rate", "pii"}
    run = world.good_run(v)  # evidence arrives before the decision
    req = gate.approve(world.approver, req)
    assert req.policy_passed and req.eval_run == run and not req.overridden


def test_reject_needs_a_comment_and_is_audited(world):
    v = world.version()
    req = gate.request_promotion(world.requester, v, "production")
    with pytest.raises(gate.GateRefused, match="Say why"):
        gate.reject(world.approver, req, "  ")
    gate.reject(world.approver, req, "Needs more votes.")
    req.refresh_from_db()
    assert req.status == PromotionRequest.Status.REJECTED and req.decision_comment == "Needs more votes."
    assert "eval.promotion.reject" in verbs()
    with pytest.raises(gate.GateRefused, match="already rejected"):
        gate.approve(world.approver, req)


def test_requester_can_withdraw(world):
    v = world.version()
    req = gate.request_promotion(world.requester, v, "production")
    with pytest.raises(gate.GateRefused, match="Only the requester or an admin"):
        gate.cancel(world.trainer, req)
    gate.cancel(world.requester, req)
    req.refresh_from_db()
    assert req.status == PromotionRequest.Status.CANCELLED and "eval.promotion.cancel" in verbs()


# =====================================================================================================
# Rollback
# =====================================================================================================


def test_rollback_returns_the_alias_to_its_previous_version(world):
    v1, v2, v3 = world.version(), world.version(), world.version()
    for v in (v1, v2, v3):
        world.good_run(v)
    world.promote(v1)
    world.promote(v2)
    world.promote(v3)
    assert gate.rollback_target(world.line, "production") == v2
    change = gate.rollback(world.approver, world.line, "production")
    assert (change.kind, change.from_version, change.to_version) == ("rollback", v3, v2)
    assert Alias.objects.get(name="production").version == v2
    # a second rollback goes one more promotion back; it never re-applies the version just left
    gate.rollback(world.approver, world.line, "production")
    assert Alias.objects.get(name="production").version == v1
    with pytest.raises(gate.GateRefused, match="no earlier version to return to"):
        gate.rollback(world.approver, world.line, "production")
    history = list(AliasChange.objects.filter(alias="production").values_list("kind", "to_version__number"))
    assert history == [("rollback", 1), ("rollback", 2), ("promote", 3), ("promote", 2), ("promote", 1)]
    rollbacks = AuditEvent.objects.filter(verb="eval.alias.rollback").order_by("id")
    assert [(e.data["from_version"], e.data["to_version"]) for e in rollbacks] == [
        (v3.pk, v2.pk),
        (v2.pk, v1.pk),
    ]
    events = list(WebhookEvent.objects.filter(event="model.rolled_back").order_by("id"))
    assert [e.payload["version"]["number"] for e in events] == [2, 1]
    assert events[0].payload["previous_version"]["number"] == 3
    assert verify_chain().ok


def test_rollback_after_a_new_promotion_returns_to_the_version_before_it(world):
    v1, v2, v3 = world.version(), world.version(), world.version()
    for v in (v1, v2, v3):
        world.good_run(v)
    world.promote(v1)
    world.promote(v2)
    gate.rollback(world.approver, world.line, "production")  # back to v1
    world.promote(v3)  # v1 → v3
    assert gate.rollback(world.approver, world.line, "production").to_version == v1


def test_rollback_refusals(world):
    v = world.version()
    with pytest.raises(gate.GateRefused, match="does not exist"):
        gate.rollback(world.approver, world.line, "production")
    world.good_run(v)
    world.promote(v)
    with pytest.raises(gate.GateRefused, match="Only admins"):
        gate.rollback(world.requester, world.line, "production")
    with pytest.raises(gate.GateRefused, match="support/1 is the first version it pointed at"):
        gate.rollback(world.approver, world.line, "production")


def test_rollback_button_is_one_post_for_admins(world, client_for):
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.good_run(v2)
    world.promote(v1)
    world.promote(v2)
    admin = client_for(world.approver)
    page = admin.get(reverse("eval:model", args=[world.line.pk])).content.decode()
    assert "Roll back to v1" in page and "data-confirm" in page
    response = admin.post(
        reverse("eval:rollback", args=[world.line.pk]), {"alias": "production"}, follow=True
    )
    assert Alias.objects.get(name="production").version == v1
    assert "rolled back from support/2 to support/1" in response.content.decode()
    response = admin.post(
        reverse("eval:rollback", args=[world.line.pk]), {"alias": "production"}, follow=True
    )
    assert "no earlier version to return to" in response.content.decode()


# =====================================================================================================
# Atomic alias move
# =====================================================================================================


@pytest.mark.django_db(transaction=True)
def test_concurrent_approvals_for_one_alias_move_it_once_and_supersede_the_other(world, make_user):
    """Two admins approve two pending requests for one alias at the same moment: the first to get the
    line's lock moves the alias and cancels the other request as superseded, so the second approval is
    refused instead of moving the alias a second time."""
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.good_run(v2)
    second_admin = make_user("bea", ADMIN)
    requests = [gate.request_promotion(world.requester, v, "production") for v in (v1, v2)]
    barrier = threading.Barrier(2)
    errors = []

    def approve(req, user):
        try:
            barrier.wait(5)
            gate.approve(user, req)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=approve, args=(requests[0], world.approver)),
        threading.Thread(target=approve, args=(requests[1], second_admin)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], gate.GateRefused), errors
    assert "already cancelled. Superseded: promotion" in str(errors[0])
    assert Alias.objects.filter(registered_model=world.line, name="production").count() == 1
    change = AliasChange.objects.get()
    assert change.from_version is None
    assert Alias.objects.get(name="production").version == change.to_version
    approved = PromotionRequest.objects.get(status="approved")
    cancelled = PromotionRequest.objects.get(status="cancelled")
    assert approved.version == change.to_version and approved.previous_version is None
    assert cancelled.decision_comment.startswith(f"Superseded: promotion {approved.pk} moved production")
    assert WebhookEvent.objects.count() == 1 and verify_chain().ok


# =====================================================================================================
# Pages and the role matrix
# =====================================================================================================


def test_promotion_page_shows_each_rule_and_the_decision_form(world, client_for):
    v = world.version()
    world.run(v, wins=16, losses=14)
    req = gate.request_promotion(world.requester, v, "production")
    page = client_for(world.approver).get(reverse("eval:promotion", args=[req.pk])).content.decode()
    assert 'data-rule="win_rate"' in page and "0.53 [0.36, 0.70]" in page
    assert "30 votes (needs 30)" in page and "fails" in page
    assert "Approve with override" in page and 'name="justification"' in page
    requester_page = (
        client_for(world.requester).get(reverse("eval:promotion", args=[req.pk])).content.decode()
    )
    assert "0.53 [0.36, 0.70]" in requester_page and "Approve with override" not in requester_page


def test_approve_and_override_through_the_ui(world, client_for):
    v = world.version()
    world.run(v, wins=16, losses=14)
    req = gate.request_promotion(world.requester, v, "production")
    admin = client_for(world.approver)
    url = reverse("eval:promotion_approve", args=[req.pk])
    page = admin.post(url, {"comment": "ok"}, follow=True).content.decode()
    assert "The policy check fails" in page and not Alias.objects.exists()
    why = "Lower bound 0.36 accepted: the old version is down and this one is no worse."
    page = admin.post(url, {"override": "1", "justification": why}, follow=True).content.decode()
    assert "now points at support/1" in page
    req.refresh_from_db()
    assert req.overridden and req.justification == why


def test_request_through_the_version_page(world, client_for):
    v = world.version()
    run = world.good_run(v)
    client = client_for(world.requester)
    response = client.post(
        reverse("eval:promotion_request", args=[v.pk]),
        {"alias": "staging", "eval_run": run.pk, "comment": "hi"},
    )
    req = PromotionRequest.objects.get()
    assert response.status_code == 302 and response["Location"] == req.get_absolute_url()
    assert (req.alias, req.eval_run, req.requested_by) == ("staging", run, world.requester)
    response = client.post(reverse("eval:promotion_request", args=[v.pk]), {"alias": "staging"}, follow=True)
    assert "is already waiting" in response.content.decode()


def test_promotions_page_lists_pending_first_and_warns_without_webhook_urls(world, client_for, settings):
    settings.STUDIO_WEBHOOK_URLS = []
    v1, v2 = world.version(), world.version()
    world.good_run(v1)
    world.promote(v1)
    pending = gate.request_promotion(world.requester, v2, "production")
    page = client_for(world.approver).get(reverse("eval:promotions")).content.decode()
    assert "Webhooks are not configured" in page and "1 event wait" in page
    assert page.index(f"request {pending.pk}") < page.index("History")


@pytest.fixture
def gate_urls(world):
    v = world.version()
    world.good_run(v)
    req = gate.request_promotion(world.requester, v, "production")
    return {
        "get": {
            "promotions": reverse("eval:promotions"),
            "promotion": reverse("eval:promotion", args=[req.pk]),
        },
        "post": {
            "request": reverse("eval:promotion_request", args=[v.pk]),
            "approve": reverse("eval:promotion_approve", args=[req.pk]),
            "reject": reverse("eval:promotion_reject", args=[req.pk]),
            "cancel": reverse("eval:promotion_cancel", args=[req.pk]),
            "rollback": reverse("eval:rollback", args=[world.line.pk]),
        },
    }


def test_reviewers_and_curators_are_denied_every_gate_page_and_action(world, gate_urls, client_for):
    for user in (world.voter, world.curator):
        client = client_for(user)
        for url in gate_urls["get"].values():
            assert client.get(url).status_code == 403, url
        for url in gate_urls["post"].values():
            assert client.post(url, {"alias": "production", "comment": "x"}).status_code == 403, url
    assert PromotionRequest.objects.get().status == "pending" and PromotionRequest.objects.count() == 1


def test_engineers_read_requests_but_cannot_decide_or_roll_back(world, gate_urls, client_for):
    client = client_for(world.trainer)
    assert client.get(gate_urls["get"]["promotions"]).status_code == 403
    assert client.get(gate_urls["get"]["promotion"]).status_code == 200
    for name in ("approve", "reject", "rollback"):
        assert (
            client.post(gate_urls["post"][name], {"alias": "production", "comment": "x"}).status_code == 403
        )
    assert PromotionRequest.objects.get().status == "pending"


def test_admins_reach_every_gate_page(world, gate_urls, client_for):
    client = client_for(world.approver)
    for url in gate_urls["get"].values():
        assert client.get(url).status_code == 200, url


def test_gate_actions_need_post_and_csrf(world, gate_urls, client_for):
    client = client_for(world.approver, enforce_csrf_checks=True)
    assert client.get(gate_urls["post"]["approve"]).status_code == 405
    assert client.post(gate_urls["post"]["approve"]).status_code == 403  # no CSRF token
    assert PromotionRequest.objects.get().status == "pending"


# =====================================================================================================
# manage.py promote
# =====================================================================================================


def test_promote_command_creates_a_request_and_prints_the_policy(world):
    v = world.version()
    world.good_run(v)
    out = StringIO()
    call_command(
        "promote", str(v.pk), "--alias", "production", "--by", "rita", "--comment", "cli", stdout=out
    )
    req = PromotionRequest.objects.get()
    lines = out.getvalue().splitlines()
    assert lines[0] == f"promotion request {req.pk}: support/1 → production (pending)"
    assert "  [PASS] At least 30 votes: 30 votes (needs 30) — on run" in lines[1]
    assert lines[-1] == str(req.pk)
    assert req.requested_by == world.requester and req.comment == "cli"


def test_promote_command_refusals_exit_non_zero(world):
    v = world.version()
    with pytest.raises(CommandError, match="Model version 999 does not exist"):
        call_command("promote", "999", "--by", "rita")
    with pytest.raises(CommandError, match="User “nobody” does not exist"):
        call_command("promote", str(v.pk), "--by", "nobody")
    with pytest.raises(CommandError, match="Only engineers and admins"):
        call_command("promote", str(v.pk), "--by", "vic")
    out = StringIO()
    call_command("promote", str(v.pk), "--by", "rita", stdout=out)  # created, but the policy fails
    assert "[FAIL] At least 30 votes: no evaluation run" in out.getvalue()
    with pytest.raises(CommandError, match="already waiting"):
        call_command("promote", str(v.pk), "--by", "rita")
    with pytest.raises(CommandError, match=r"policy: fails \(votes, win_rate, pii\).*no request was filed"):
        call_command(
            "promote", str(v.pk), "--alias", "staging", "--by", "rita", "--strict", stdout=StringIO()
        )
    assert not PromotionRequest.objects.filter(alias="staging").exists()  # --strict files nothing


# =====================================================================================================
# The whole path with the real services: evaluation on a tiny model → blind votes → gate → alias → serving
# name → rollback
# =====================================================================================================


@pytest.fixture
def _heartbeat_off(settings):
    settings.STUDIO_JOB_HEARTBEAT_SECONDS = 3600  # no heartbeat thread writing outside the test transaction


def test_evaluate_vote_promote_serve_and_roll_back_with_real_services(
    world, tiny_model_dir, settings, make_user, _heartbeat_off
):
    from pathlib import Path

    from datasets_app.models import Example
    from datasets_app.services import versions
    from datasets_app.services.datasets import create_dataset
    from eval_app.services import evaluation, voting
    from eval_app.services.registry import resolve_model_name
    from training_app.services import register_local_dir

    settings.STUDIO_GATE_MIN_VOTES = 6
    settings.STUDIO_VOTE_OVERLAP_SHARE = 0.0
    settings.STUDIO_EVAL_MAX_NEW_TOKENS = 8
    base = register_local_dir("tiny-llama", Path(tiny_model_dir), world.approver)
    dataset = create_dataset("golden-support", "sft", world.curator)
    for i in range(6):
        Example.objects.create(
            dataset=dataset,
            position=i,
            messages=[
                {"role": "user", "content": f"where is my parcel {i}"},
                {"role": "assistant", "content": "it ships tomorrow"},
            ],
            split="golden",
            content_hash=f"{i:064d}",
            token_count=10,
            pii_status=Example.Pii.CLEAN,
        )
    golden = versions.freeze(dataset, world.curator, changelog="golden")
    v1, v2 = world.version(), world.version()
    ModelVersion.objects.filter(pk__in=[v1.pk, v2.pk]).update(
        base_model=base, artifacts_dir=str(tiny_model_dir)
    )
    v1.refresh_from_db()
    v2.refresh_from_db()

    def evaluate_and_vote(version, baseline_kind):
        run = evaluation.create_run(world.trainer, version, baseline_kind, golden, max_new_tokens=8)
        run = evaluation.execute_run(run.pk, "test-worker")
        assert run.state == EvalRun.State.SUCCEEDED, run.error_message
        assert run.metrics["candidate"]["eval_loss"] > 0 and run.pii_leaks == 0
        while (comparison := voting.claim_next(world.voter, run)) is not None:
            voting.cast_vote(world.voter, comparison, "b" if comparison.swapped else "a")  # the candidate
        return run

    run1 = evaluate_and_vote(v1, "base")
    req = gate.request_promotion(world.requester, v1, "production")
    assert req.policy_passed, req.policy["rules"]
    assert rule(req.policy, "votes")["figure"] == "6 votes (needs 6)"
    gate.approve(world.approver, req)
    assert resolve_model_name("support@production") == v1

    run2 = evaluate_and_vote(v2, "production")  # same weights as production: 0% loss change
    assert run2.baseline_version == v1
    req2 = gate.request_promotion(world.requester, v2, "production")
    assert req2.policy_passed and rule(req2.policy, "eval_loss")["figure"].endswith("(+0.0%)")
    assert f"production measured in run {run2.pk}" in rule(req2.policy, "eval_loss")["detail"]
    gate.approve(world.approver, req2)
    assert resolve_model_name("support@production") == v2

    gate.rollback(world.approver, world.line, "production")
    assert resolve_model_name("support@production") == v1
    assert run1.pk != run2.pk
    assert list(WebhookEvent.objects.order_by("id").values_list("event", flat=True)) == [
        "model.promoted",
        "model.promoted",
        "model.rolled_back",
    ]
    assert verify_chain().ok
