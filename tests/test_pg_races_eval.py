"""Real races on PostgreSQL in the evaluation, voting, registry, gate and serving flows.

The method and the helpers are those of tests/test_pg_races.py: two calls run at the same moment in two
threads, each with its own database connection (`transaction=True`), released by a barrier, in three
orders (together, and each side first: it holds its locks, waiting in a hook until the other side is
blocked on one of them or has finished); every racer's connection has a `lock_timeout`, the threads are
joined with a timeout, and a DeadlockDetected (or a lock wait that ends in the timeout) fails the test.
Afterwards the invariants are checked: final states, counts, the audit events, and the audit chain.

- a reviewer's vote (or skip) vs the same person opening the run's page, which records an audit event and
  then gives back the slots they hold on the run;
- two submits on one comparison through the review pages: two reviewers of an overlap item, a double
  submit of the vote form, a vote and a skip of the same comparison; a vote sent as its claim runs out vs
  the same form submitted again (that page must find the vote, not a comparison filled by someone else);
- cancelling an evaluation run vs the worker finishing it;
- a gpu worker claiming a queued run vs a cancel;
- rolling an alias back vs an approval moving it;
- a double-submitted promotion request;
- revoking an API key vs a request using it.

No model is loaded: runs, generations and comparisons are written straight to the database (the worker's
finishing step runs on them), and the API's completion is a stand-in. SQLite runs write transactions one
at a time, so these tests only run on PostgreSQL.
"""

from __future__ import annotations

import pytest
import test_eval_stats
from django.urls import reverse
from django.utils import timezone
from test_gate import World
from test_gate import world as world  # noqa: F401 - the fixture (the gate's model line and people)
from test_pg_races import ORDERS, alias_changes, audit_verbs, hold, race, refused, verb_is
from test_pg_races import pytestmark as pytestmark  # transaction=True, PostgreSQL only
from test_pg_races import second_admin as second_admin  # noqa: F401 - the fixture
from test_serving import chat
from test_voting import reviewers as reviewers  # noqa: F401 - the fixture

from eval_app.models import (
    AliasChange,
    Assignment,
    Comparison,
    EvalRun,
    Generation,
    PromotionRequest,
    Vote,
    WebhookEvent,
)
from eval_app.services import evaluation, gate, serving, voting
from studio import audit
from studio.audit import verify_chain
from studio.models import AuditEvent

# the voting tests' world (runs with comparisons, written to the database) under another name: `world`
# is the gate's (a model line, versions with evidence, and the people of the gate)
vote_world = test_eval_stats.world

ITERATIONS = 3

QUEUED, RUNNING = EvalRun.State.QUEUED, EvalRun.State.RUNNING
SUCCEEDED, CANCELLED = EvalRun.State.SUCCEEDED, EvalRun.State.CANCELLED


def events(verb: str, obj) -> int:
    return AuditEvent.objects.filter(
        verb=verb, object_type=obj._meta.model_name, object_id=str(obj.pk)
    ).count()


def holds_slot(reviewer, comparison) -> bool:
    return Assignment.objects.filter(
        comparison=comparison, reviewer=reviewer, skipped=False, expires_at__gt=timezone.now()
    ).exists()


def assert_counted_once(comparison: Comparison) -> list[int]:
    """The comparison's vote counter matches its votes, one eval.vote event each; returns the voters."""
    comparison.refresh_from_db()
    voters = list(
        Vote.objects.filter(comparison=comparison).order_by("id").values_list("reviewer", flat=True)
    )
    assert comparison.votes_count == len(voters) == events("eval.vote", comparison)
    assert len(set(voters)) == len(voters)
    return voters


# =====================================================================================================
# Voting
# =====================================================================================================


@pytest.mark.parametrize("how", ["vote", "skip"])
@pytest.mark.parametrize("order", ORDERS)
def test_a_vote_or_skip_vs_the_same_person_opening_the_runs_page(
    order, how, vote_world, reviewers, monkeypatch
):
    """The run's page records "eval.run.unblind" and gives back the person's slots on the run, while their
    vote (or skip) in another tab holds the comparison's and the assignment's row locks and is about to
    record its own event. The vote counts, or is refused as no longer blind; never both, never stuck."""
    reviewer = reviewers[0]
    verb = {"vote": "eval.vote", "skip": "eval.vote.skip"}[how]
    version = vote_world.version(1)
    outcomes = []
    for _ in range(ITERATIONS):
        run = vote_world.run(version, n=1)
        comparison = voting.claim_next(reviewer, run)
        assert comparison is not None
        if how == "vote":
            act = (how, lambda c=comparison: voting.cast_vote(reviewer, c, "a"))
        else:
            act = (how, lambda c=comparison: voting.skip(reviewer, c))
        unblind = ("unblind", lambda run=run: voting.mark_unblinded(run, reviewer))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the vote/skip holds the comparison's and the assignment's locks
                leading = hold(mp, audit, "record", thread=how, when=verb_is(verb))
                actor, opener = race(act, unblind, second_waits_for=leading)
            elif order == "second-leads":  # the page holds the slot it gives back
                leading = hold(mp, audit, "record", thread="unblind", when=verb_is(voting.UNBLIND_VERB))
                actor, opener = race(act, unblind, first_waits_for=leading)
            else:
                actor, opener = race(act, unblind)
        assert opener.error is None and opener.result is True, opener.error
        assert events(voting.UNBLIND_VERB, run) == 1
        assert not holds_slot(reviewer, comparison)  # voted, skipped or given back: no slot held
        voters = assert_counted_once(comparison)
        if how == "skip":
            outcomes.append("skipped")
            assert actor.error is None, actor.error
            assert Assignment.objects.get(comparison=comparison, reviewer=reviewer).skipped
            assert voters == [] and events("eval.vote.skip", comparison) == 1
        elif refused(actor, voting.VoteRefused):  # the page's event committed first: not blind any more
            outcomes.append("refused")
            assert str(actor.error).startswith("You opened this evaluation run's page")
            assert voters == []
        else:  # the vote read the person's blindness before the page's event committed
            outcomes.append("voted")
            assert voters == [reviewer.pk]
    if how == "skip":
        assert outcomes == ["skipped"] * ITERATIONS
    elif order == "first-leads":  # the vote held its locks before the page started: it counts
        assert outcomes == ["voted"] * ITERATIONS
    # second-leads: the vote reads the person's blindness before it waits for the slot's row lock the page
    # holds, so it counts (read before the page's event committed); one read after that commit is refused:
    # either outcome is correct, the race is about that row lock
    assert verify_chain().ok


@pytest.mark.parametrize("second", ["other-reviewer", "double-submit", "skip"])
@pytest.mark.parametrize("order", ORDERS)
def test_two_submits_on_one_comparison_through_the_review_pages(
    order, second, vote_world, reviewers, client_for, monkeypatch
):
    """A vote, and at once a second reviewer's vote on the same overlap item, the same vote form submitted
    again (two tabs), or a skip of the same comparison: each vote counted once, a comparison voted or
    skipped by one person but never both, and every page answers with a redirect or a refusal, never an
    error."""
    one, other = reviewers[0], reviewers[1]
    version = vote_world.version(1)
    outcomes = []
    for _ in range(ITERATIONS):
        run = vote_world.run(version, n=1, wanted=[2 if second == "other-reviewer" else 1])
        comparison = voting.claim_next(one, run)
        assert comparison is not None
        if second == "other-reviewer":
            assert voting.claim_next(other, run) == comparison
        vote_url = reverse("eval:review", args=[comparison.pk])
        done_url = reverse("eval:review_done", args=[comparison.pk])
        first_client = client_for(one)  # each submit from its own browser session (tab)
        second_client = client_for(other if second == "other-reviewer" else one)
        first = ("vote", lambda c=first_client, url=vote_url: c.post(url, {"choice": "a"}))
        if second == "skip":
            skip_url = reverse("eval:review_skip", args=[comparison.pk])
            then = ("skip", lambda c=second_client, url=skip_url: c.post(url))
        else:
            then = ("again", lambda c=second_client, url=vote_url: c.post(url, {"choice": "b"}))
        verb = "eval.vote.skip" if second == "skip" else "eval.vote"
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the vote holds the comparison's and the assignment's locks
                leading = hold(mp, audit, "record", thread="vote", when=verb_is("eval.vote"))
                voted, again = race(first, then, second_waits_for=leading)
            elif order == "second-leads":
                leading = hold(mp, audit, "record", thread=then[0], when=verb_is(verb))
                voted, again = race(first, then, first_waits_for=leading)
            else:
                voted, again = race(first, then)
        assert voted.error is None and again.error is None, (voted.error, again.error)
        first_page, second_page = voted.result, again.result
        voters = assert_counted_once(comparison)
        assignment = Assignment.objects.get(comparison=comparison, reviewer=one)
        if second == "other-reviewer":
            outcomes.append("both")
            assert sorted(voters) == sorted([one.pk, other.pk])
            for page in (first_page, second_page):
                assert page.status_code == 302 and page["Location"] == done_url
        elif second == "double-submit":
            outcomes.append("once")
            assert voters == [one.pk]
            for page in (first_page, second_page):  # the second submit lands on the first vote's page
                assert page.status_code == 302 and page["Location"] == done_url
        elif voters:  # the vote went first: the skip is refused (it lands on the vote's page)
            outcomes.append("voted")
            assert voters == [one.pk] and not assignment.skipped
            assert events("eval.vote.skip", comparison) == 0
            assert first_page.status_code == 302 and first_page["Location"] == done_url
            assert second_page.status_code == 302 and second_page["Location"] == done_url
        else:  # the skip went first: the vote is refused (the comparison is no longer the reviewer's)
            outcomes.append("skipped")
            assert assignment.skipped and events("eval.vote.skip", comparison) == 1
            assert first_page.status_code in (400, 404), first_page.status_code
            assert second_page.status_code == 302
    if second == "skip" and order == "first-leads":
        assert outcomes == ["voted"] * ITERATIONS
    elif second == "skip" and order == "second-leads":
        assert outcomes == ["skipped"] * ITERATIONS
    assert verify_chain().ok


@pytest.mark.parametrize("order", ORDERS)
def test_a_vote_as_its_claim_runs_out_vs_the_same_form_submitted_again(
    order, vote_world, reviewers, client_for, monkeypatch
):
    """A vote whose page was let through just before the reviewer's claim ran out (the service call, the
    claim expired, the comparison's one slot still free), and the same form submitted again from another
    tab. The second submit's page finds no vote yet (uncommitted) and an expired claim, so it waits for
    the comparison's row lock to renew it: once the vote has committed, that page must see the vote and
    land on it, not count the reviewer's own vote as someone else's filled slot (a 404). This is the
    together-double-submit race above, which hits it only when the vote commits between the page's
    reads, made certain."""
    one = reviewers[0]
    version = vote_world.version(1)
    outcomes = []
    for _ in range(ITERATIONS):
        run = vote_world.run(version, n=1)
        comparison = voting.claim_next(one, run)
        assert comparison is not None
        Assignment.objects.filter(comparison=comparison, reviewer=one).update(expires_at=timezone.now())
        done_url = reverse("eval:review_done", args=[comparison.pk])
        vote_url = reverse("eval:review", args=[comparison.pk])
        tab = client_for(one)  # the other tab
        vote = ("vote", lambda c=comparison: voting.cast_vote(one, c, "a"))
        again = ("again", lambda c=tab, url=vote_url: c.post(url, {"choice": "b"}))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the vote holds the comparison's lock, its vote inserted uncommitted
                leading = hold(mp, audit, "record", thread="vote", when=verb_is("eval.vote"))
                voter, submitter = race(vote, again, second_waits_for=leading)
            elif order == "second-leads":  # the page renewed the claim; its vote holds the lock
                leading = hold(mp, audit, "record", thread="again", when=verb_is("eval.vote"))
                voter, submitter = race(vote, again, first_waits_for=leading)
            else:
                voter, submitter = race(vote, again)
        assert submitter.error is None, submitter.error
        page = submitter.result
        assert page.status_code == 302 and page["Location"] == done_url, page.status_code
        voters = assert_counted_once(comparison)
        assert voters == [one.pk]
        (cast,) = Vote.objects.filter(comparison=comparison)
        if refused(voter, voting.VoteRefused):  # the page's vote went first
            outcomes.append("page")
            assert str(voter.error) == voting.ALREADY_VOTED and cast.choice == "b"
        else:
            outcomes.append("vote")
            assert voter.result.pk == cast.pk and cast.choice == "a"
        assert not holds_slot(one, comparison)
    if order == "first-leads":
        assert outcomes == ["vote"] * ITERATIONS
    elif order == "second-leads":
        assert outcomes == ["page"] * ITERATIONS
    assert verify_chain().ok


# =====================================================================================================
# Evaluation runs: the worker's claim and finish vs a cancel or a second worker
# =====================================================================================================


def queued_run(vote_world, version, n: int) -> EvalRun:
    """A queued run whose `n` answers per side are already saved (no comparisons yet)."""
    run = vote_world.run(version, n=n, state=QUEUED)
    Comparison.objects.filter(run=run).delete()
    return run


@pytest.fixture
def finish_without_models(monkeypatch, settings):
    """The worker's execution goes straight to its finishing step (the answers are in the database): no
    model is loaded, the PII scan finds nothing, and the heartbeat thread never beats."""
    settings.STUDIO_JOB_HEARTBEAT_SECONDS = 3600

    def finish_at_once(self):
        self.check()
        self.finish([], 0, 0, {Generation.Side.CANDIDATE: (0.0, 0), Generation.Side.BASELINE: (0.0, 0)})

    clean = {"pii_entities": [], "canary_hits": [], "flagged": False}
    monkeypatch.setattr(evaluation._Execution, "execute", finish_at_once)
    monkeypatch.setattr(evaluation, "pii_scanner", lambda run=None: None)
    monkeypatch.setattr(evaluation, "scan_outputs", lambda outputs, prompts, **kw: [clean] * len(outputs))


@pytest.mark.parametrize("order", ORDERS)
def test_cancelling_a_run_vs_the_worker_finishing_it(order, vote_world, finish_without_models, monkeypatch):
    version = vote_world.version(1)
    outcomes = []
    for i in range(ITERATIONS):
        run = queued_run(vote_world, version, n=2)
        claimed = evaluation.claim(run.pk, f"gpu-{i}")
        finish = ("finish", lambda claimed=claimed: evaluation.run_claimed(claimed))
        cancel = ("cancel", lambda run=run: evaluation.cancel_run(run, vote_world.owner))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the worker holds the run's row, succeeded uncommitted
                leading = hold(mp, audit, "record", thread="finish", when=verb_is("eval.run.finish"))
                finisher, canceller = race(finish, cancel, second_waits_for=leading)
            elif order == "second-leads":  # the cancel holds the row, flagged uncommitted
                leading = hold(mp, audit, "record", thread="cancel", when=verb_is("eval.run.cancel"))
                finisher, canceller = race(finish, cancel, first_waits_for=leading)
            else:
                finisher, canceller = race(finish, cancel)
        assert finisher.error is None, finisher.error
        run.refresh_from_db()
        assert run.finished_at is not None and run.attempt == 1
        if refused(canceller, evaluation.EvalRefused):  # finished first: too late to cancel
            outcomes.append("finished")
            assert str(canceller.error) == "This run has already finished."
            assert run.state == SUCCEEDED and not run.cancel_requested
            assert run.comparisons.count() == 2
            assert audit_verbs(run) == ["eval.run.start", "eval.run.finish"]
        else:  # flagged first: the worker's finish found the flag and ended the run cancelled
            outcomes.append("cancelled")
            assert canceller.result.pk == run.pk
            assert run.state == CANCELLED and run.cancel_requested
            assert not run.comparisons.exists()
            assert audit_verbs(run) == ["eval.run.start", "eval.run.cancel", "eval.run.cancelled"]
            event = AuditEvent.objects.get(verb="eval.run.cancel", object_id=str(run.pk))
            assert event.data == {"outcome": "cancel requested"}
    if order == "first-leads":
        assert outcomes == ["finished"] * ITERATIONS
    elif order == "second-leads":
        assert outcomes == ["cancelled"] * ITERATIONS
    assert verify_chain().ok


@pytest.mark.parametrize("order", ORDERS)
def test_a_worker_claiming_a_queued_run_vs_a_cancel(order, vote_world, monkeypatch):
    version = vote_world.version(1)
    outcomes = []
    for _ in range(ITERATIONS):
        run = queued_run(vote_world, version, n=0)
        claim = ("claim", lambda run=run: evaluation.claim(run.pk, "gpu-1"))
        cancel = ("cancel", lambda run=run: evaluation.cancel_run(run, vote_world.owner))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the claim holds the run's row, running uncommitted
                leading = hold(mp, audit, "record", thread="claim", when=verb_is("eval.run.start"))
                claimer, canceller = race(claim, cancel, second_waits_for=leading)
            elif order == "second-leads":  # the cancel holds it, cancelled uncommitted
                leading = hold(mp, audit, "record", thread="cancel", when=verb_is("eval.run.cancel"))
                claimer, canceller = race(claim, cancel, first_waits_for=leading)
            else:
                claimer, canceller = race(claim, cancel)
        assert claimer.error is None and canceller.error is None, (claimer.error, canceller.error)
        assert canceller.result.pk == run.pk
        run.refresh_from_db()
        cancel_event = AuditEvent.objects.get(verb="eval.run.cancel", object_id=str(run.pk))
        if claimer.result is not None:  # claimed first: the cancel flags it for the worker
            outcomes.append("claim")
            assert claimer.result.claim_token == run.claim_token
            assert run.state == RUNNING and run.attempt == 1 and run.cancel_requested
            assert audit_verbs(run) == ["eval.run.start", "eval.run.cancel"]
            assert cancel_event.data == {"outcome": "cancel requested"}
        else:  # cancelled first: no worker ever runs it
            outcomes.append("cancel")
            assert run.state == CANCELLED and run.attempt == 0 and run.claim_token == ""
            assert audit_verbs(run) == ["eval.run.cancel"]
            assert cancel_event.data == {"outcome": "cancelled"}
    if order == "first-leads":
        assert outcomes == ["claim"] * ITERATIONS
    elif order == "second-leads":
        assert outcomes == ["cancel"] * ITERATIONS
    assert verify_chain().ok


# =====================================================================================================
# The gate: rollback vs approval, a double-submitted request
# =====================================================================================================


@pytest.mark.parametrize("order", ORDERS)
def test_rolling_an_alias_back_vs_an_approval_moving_it(order, world: World, second_admin, monkeypatch):
    """The alias points at v2 (after v1); an admin rolls it back while another approves v3 for it. Both
    go through, one after the other: the history stays a chain (each change starts where the one before
    it ended) and the alias ends where its last change put it."""
    v1, v2, v3 = (world.version() for _ in range(3))
    for v in (v1, v2, v3):
        world.good_run(v)
    outcomes = []
    for i in range(ITERATIONS):
        alias = f"race-{i}"
        world.promote(v1, alias)
        world.promote(v2, alias)
        req = gate.request_promotion(world.requester, v3, alias)
        approve = ("approve", lambda req=req: gate.approve(world.approver, req))
        rollback = ("rollback", lambda alias=alias: gate.rollback(second_admin, world.line, alias))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the approval holds the line's lock
                leading = hold(mp, gate, "evaluate_policy", thread="approve")
                approver, roller = race(approve, rollback, second_waits_for=leading)
            elif order == "second-leads":  # the rollback holds it
                leading = hold(mp, gate, "rollback_target", thread="rollback")
                approver, roller = race(approve, rollback, first_waits_for=leading)
            else:
                approver, roller = race(approve, rollback)
        assert approver.error is None and roller.error is None, (approver.error, roller.error)
        changes = sorted(alias_changes(world, alias), key=lambda c: c.pk)
        for before, after in zip(changes, changes[1:], strict=False):
            assert after.from_version_id == before.to_version_id, "the alias history forked"
        alias_row = world.line.aliases.get(name=alias)
        assert alias_row.version_id == changes[-1].to_version_id
        moves = [(c.kind, c.from_version_id, c.to_version_id) for c in changes[2:]]
        promote, back = AliasChange.Kind.PROMOTE, AliasChange.Kind.ROLLBACK
        req.refresh_from_db()
        assert req.status == PromotionRequest.Status.APPROVED
        if moves[0][0] == promote:  # approved first: the rollback undid that approval
            outcomes.append("approve")
            assert moves == [(promote, v2.pk, v3.pk), (back, v3.pk, v2.pk)]
            assert req.previous_version_id == v2.pk
        else:  # rolled back first: the approval moved the alias from v1
            outcomes.append("rollback")
            assert moves == [(back, v2.pk, v1.pk), (promote, v1.pk, v3.pk)]
            assert req.previous_version_id == v1.pk
        assert roller.result.pk == changes[3 if outcomes[-1] == "approve" else 2].pk
        assert audit_verbs(req) == ["eval.promotion.request", "eval.promotion.approve"]
        assert AuditEvent.objects.filter(verb="eval.alias.rollback", data__alias=alias).count() == 1
        assert WebhookEvent.objects.filter(payload__alias=alias).count() == 4
    if order == "first-leads":
        assert outcomes == ["approve"] * ITERATIONS
    elif order == "second-leads":
        assert outcomes == ["rollback"] * ITERATIONS
    assert verify_chain().ok


@pytest.mark.parametrize("order", ORDERS)
def test_a_double_submitted_promotion_request(order, world: World, monkeypatch):
    """The request form sent twice (a double click, two tabs): one pending request, the other refused as
    already waiting."""
    v = world.version()
    world.good_run(v)
    winners = []
    for i in range(ITERATIONS):
        alias = f"race-{i}"
        one = ("request-1", lambda alias=alias: gate.request_promotion(world.requester, v, alias))
        two = ("request-2", lambda alias=alias: gate.request_promotion(world.requester, v, alias))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # request 1 has inserted its request, uncommitted
                leading = hold(
                    mp, audit, "record", thread="request-1", when=verb_is("eval.promotion.request")
                )
                racers = race(one, two, second_waits_for=leading)
            elif order == "second-leads":
                leading = hold(
                    mp, audit, "record", thread="request-2", when=verb_is("eval.promotion.request")
                )
                racers = race(one, two, first_waits_for=leading)
            else:
                racers = race(one, two)
        losers = [r for r in racers if refused(r, gate.GateRefused)]
        assert len(losers) == 1, "both requests were created" if not losers else [r.error for r in racers]
        (loser,) = losers
        (winner,) = [r for r in racers if r is not loser]
        winners.append(winner.name)
        assert (
            str(loser.error) == f"Promotion request {winner.result.pk} for {v} → {alias} is already waiting."
        )
        pending = PromotionRequest.objects.filter(
            version=v, alias=alias, status=PromotionRequest.Status.PENDING
        )
        assert [r.pk for r in pending] == [winner.result.pk]
        assert AuditEvent.objects.filter(verb="eval.promotion.request", data__alias=alias).count() == 1
    if order == "first-leads":
        assert winners == ["request-1"] * ITERATIONS
    elif order == "second-leads":
        assert winners == ["request-2"] * ITERATIONS
    assert verify_chain().ok


# =====================================================================================================
# Serving: revoking a key vs a request using it
# =====================================================================================================


@pytest.mark.parametrize("order", ORDERS)
def test_revoking_an_api_key_vs_a_request_using_it(order, world: World, engineer, client_for, monkeypatch):
    """A request authenticated before the revoke committed may still be answered (it was in flight); one
    whose key check ends after the commit — also one that waited for the revoke's row lock — gets 401,
    and so does every request after it."""
    version = world.version()
    name = f"{world.line.name}/{version.number}"
    monkeypatch.setattr(  # no model: the request's answer is a stand-in
        serving, "complete", lambda version, messages, params: serving.Completion("ok", 3, 1, "stop", 0.01)
    )
    outcomes = []
    for i in range(ITERATIONS):
        key, raw = serving.create_key(engineer, f"race-{i}")
        client = client_for(None)
        client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {raw}"
        request = ("request", lambda client=client: chat(client, model=name))
        revoke = ("revoke", lambda key=key: serving.revoke(engineer, key))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the revoke holds the key's row, revoked uncommitted
                leading = hold(mp, audit, "record", thread="revoke", when=verb_is("api_key.revoke"))
                revoker, requester = race(revoke, request, second_waits_for=leading)
            elif order == "second-leads":  # the request is being answered, its key checked
                leading = hold(mp, serving, "complete", thread="request")
                revoker, requester = race(revoke, request, first_waits_for=leading)
            else:
                revoker, requester = race(revoke, request)
        assert revoker.error is None and requester.error is None, (revoker.error, requester.error)
        assert revoker.result is True
        response = requester.result
        if response.status_code == 200:
            outcomes.append("answered")
            assert response.json()["choices"][0]["message"]["content"] == "ok"
        else:
            outcomes.append("refused")
            assert response.status_code == 401, response.content
            assert response.json()["error"]["code"] == "revoked_api_key"
        after = chat(client, model=name)
        assert after.status_code == 401 and after.json()["error"]["code"] == "revoked_api_key"
        assert events("api_key.revoke", key) == 1
    if order == "first-leads":
        assert outcomes == ["refused"] * ITERATIONS
    elif order == "second-leads":
        assert outcomes == ["answered"] * ITERATIONS
    assert verify_chain().ok
