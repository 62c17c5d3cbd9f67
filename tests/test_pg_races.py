"""Real races on PostgreSQL for the row-lock fixes of the training queue and the approval gate.

Each test runs two service calls at the same moment in two threads, each with its own database connection
(`transaction=True`: the fixtures' rows are committed and both connections see them), and checks the
invariants afterwards:

- retiring a base model vs a worker claiming a job queued on it: the job ends RUNNING (the claim won and
  the retire counted it as running) or CANCELLED with the base-retired reason (the retire won), with
  exactly the matching audit events; never still queued, never running after being counted as cancelled;
- retiring a base model vs launching a job on it: the launch is refused and nothing is created, or the
  job is created and then cancelled by the retire; never left queued on a retired model;
- two admins approving two requests for one alias: one approval, one refusal naming the supersession, one
  alias change; approving a request vs withdrawing it; approving one request vs withdrawing or rejecting
  the other pending one for the same alias;
- a worker claiming a job vs another job of the same base model registering the first version of a new
  model line.

Every race runs in three orders, each a few times: both threads released together by a barrier, and each
side first: it holds its row lock, waiting in a hook while the other side starts, until that side is
blocked on one of its locks (PostgreSQL's pg_locks shows its backend waiting) or has finished without
waiting. No fixed sleep: a slow start of the other side (a loaded machine) cannot turn the order around.
None may deadlock or hang: every racer's connection gets a `lock_timeout`, the threads are joined with a
timeout, and PostgreSQL's DeadlockDetected (raised by its deadlock detector after `deadlock_timeout`) fails
the test. SQLite runs write transactions one at a time, so these tests only run on PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import job_verbs, make_version, smoke_request
from django.db import connection
from test_gate import World
from test_gate import world as world  # noqa: F401 - the fixture

from eval_app.models import Alias, AliasChange, PromotionRequest, WebhookEvent
from eval_app.services import gate, webhooks
from eval_app.services.registry import register_job_result
from studio import audit
from studio.audit import verify_chain
from studio.models import AuditEvent
from studio.roles import ADMIN
from training_app.models import BaseModel, TrainingJob
from training_app.services import jobs, register_local_dir, set_status

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="needs PostgreSQL: SQLite runs write transactions one at a time, so nothing races",
    ),
]

ITERATIONS = 5
# the leading side holds its locks until the other side is blocked on one of them or has finished; this
# long at most (a follower neither blocked nor finished by then is stuck elsewhere: the race fails)
HOLD_MAX = 10.0
POLL = 0.005  # seconds between two looks at the other side
LOCK_TIMEOUT_MS = 10_000  # a racer's lock wait this long is a hang, not a wait: it fails, it never blocks
RACE_TIMEOUT = 30  # seconds for a whole race; PostgreSQL's deadlock_timeout is 1 s
ORDERS = ("together", "first-leads", "second-leads")

QUEUED, RUNNING, CANCELLED = TrainingJob.State.QUEUED, TrainingJob.State.RUNNING, TrainingJob.State.CANCELLED


# =====================================================================================================
# Racing two service calls
# =====================================================================================================


class Racer(threading.Thread):
    """One side of a race: its own database connection, released by the barrier (and, when it is the
    follower, only once the leader holds its locks), its result or exception kept for the test."""

    def __init__(self, name: str, action, barrier: threading.Barrier, wait_for: threading.Event | None):
        super().__init__(name=name, daemon=True)
        self.action, self.barrier, self.wait_for = action, barrier, wait_for
        self.result = self.error = None
        self.pid: int | None = None  # its connection's backend, for the leader to see it waiting
        self.done = threading.Event()  # its call returned or raised: its transaction is over

    def run(self) -> None:
        try:
            with connection.cursor() as cursor:  # a lock wait that never ends fails instead of hanging
                cursor.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
                cursor.execute("SELECT pg_backend_pid()")
                self.pid = cursor.fetchone()[0]
            self.barrier.wait(RACE_TIMEOUT)
            if self.wait_for is not None:
                self.wait_for.wait(RACE_TIMEOUT / 3)
            self.result = self.action()
        except BaseException as exc:  # noqa: BLE001 - asserted by the test
            self.error = exc
        finally:
            self.done.set()
            connection.close()


class Leading(threading.Event):
    """Set by the leading side once it holds its locks (see `hold`); `race` names the side that follows."""

    follower: Racer | None = None
    gave_up = False  # the follower neither blocked nor finished within HOLD_MAX: `race` fails

    def wait_for_follower(self) -> None:
        """Called by the leader, holding its locks: return once the follower is blocked on a lock (its
        backend has a lock request not granted: the leader holds it, nothing else runs) or has finished
        without needing one; at most HOLD_MAX seconds. Asked on the leader's own connection: pg_locks is
        read afresh on every statement, also inside a transaction."""
        deadline = time.monotonic() + HOLD_MAX
        while time.monotonic() < deadline:
            follower = self.follower
            if follower is not None and (follower.done.is_set() or _waiting_for_a_lock(follower.pid)):
                return
            time.sleep(POLL)
        self.gave_up = True


def _waiting_for_a_lock(pid: int | None) -> bool:
    if pid is None:
        return False
    with connection.cursor() as cursor:
        cursor.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted)", [pid])
        return cursor.fetchone()[0]


def _is_deadlock(exc: BaseException | None) -> bool:
    while exc is not None:
        if type(exc).__name__ in ("DeadlockDetected", "LockNotAvailable") or "deadlock detected" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def race(first, second, *, second_waits_for: threading.Event | None = None, first_waits_for=None):
    """Run `first` and `second` (name, callable) at once; both finish within RACE_TIMEOUT and neither
    deadlocked or timed out on a lock. Returns the two Racers."""
    barrier = threading.Barrier(2)
    racers = [
        Racer(first[0], first[1], barrier, first_waits_for),
        Racer(second[0], second[1], barrier, second_waits_for),
    ]
    for leading, follower in ((second_waits_for, racers[1]), (first_waits_for, racers[0])):
        if isinstance(leading, Leading):
            leading.follower = follower
    for racer in racers:
        racer.start()
    deadline = time.monotonic() + RACE_TIMEOUT
    for racer in racers:
        racer.join(max(0.0, deadline - time.monotonic()))
    stuck = [r.name for r in racers if r.is_alive()]
    assert not stuck, f"{stuck} still running after {RACE_TIMEOUT} s: a lock wait that never ends"
    locked = {r.name: repr(r.error) for r in racers if _is_deadlock(r.error)}
    assert not locked, f"deadlock (or a lock wait of {LOCK_TIMEOUT_MS} ms) in the race: {locked}"
    for leading, follower in ((second_waits_for, racers[1]), (first_waits_for, racers[0])):
        assert not getattr(leading, "gave_up", False), (
            f"{follower.name} neither waited for a lock nor finished in {HOLD_MAX} s while the other "
            "side held its locks: the order of the race was not the one the test asked for"
        )
    return racers


def hold(mp: pytest.MonkeyPatch, owner, name: str, *, thread: str, when=None) -> Leading:
    """Make `owner.name`, when called in the racer `thread` (and `when(*args)` holds), wait before it runs
    until the other side of the race is blocked on a lock or has finished: a hook inside that side's
    transaction, after it has taken its locks. The event returned (pass it to `race` as the other side's
    `…_waits_for`) is set as the wait starts, so the other side starts exactly then."""
    real = getattr(owner, name)
    holding = Leading()

    def held(*args, **kwargs):
        if threading.current_thread().name == thread and (when is None or when(*args, **kwargs)):
            holding.set()
            holding.wait_for_follower()
        return real(*args, **kwargs)

    mp.setattr(owner, name, held)
    return holding


def verb_is(verb: str):
    return lambda actor, v, *args, **kwargs: v == verb


def refused(racer: Racer, kind: type[Exception]) -> bool:
    """The racer's call was refused with `kind` (any other exception fails the test here)."""
    if racer.error is None:
        return False
    assert isinstance(racer.error, kind), f"{racer.name} raised {racer.error!r}"
    return True


def audit_verbs(obj) -> list[str]:
    return list(
        AuditEvent.objects.filter(object_type=obj._meta.model_name, object_id=str(obj.pk))
        .order_by("id")
        .values_list("verb", flat=True)
    )


# =====================================================================================================
# Training: retire vs claim, retire vs launch
# =====================================================================================================


@pytest.fixture
def version(curator):
    return make_version(curator)


def fresh_base(tiny_model_dir, admin_user, label: str) -> BaseModel:
    """An available base model of its own for one iteration (retiring is what the race does to it)."""
    return register_local_dir(label, Path(tiny_model_dir), admin_user)


def retire_event(base: BaseModel) -> AuditEvent:
    return AuditEvent.objects.get(verb="base_model.retired", object_id=str(base.pk))


def assert_cancelled_by_retire(job: TrainingJob, base: BaseModel) -> None:
    assert job.state == CANCELLED and job.finished_at is not None
    assert job.error_code == jobs.BASE_RETIRED
    assert (
        job.error_message
        == f"Cancelled: the base model {base.name} was retired by ada before this job started."
    )
    assert job.attempt == 0 and job.started_at is None and job.worker == "" and job.claim_token == ""
    assert job_verbs(job) == ["training.job.create", "training.job.cancel"]
    event = AuditEvent.objects.get(verb="training.job.cancel", object_id=str(job.pk))
    assert event.actor_name == "ada" and event.data == {"outcome": "cancelled", "reason": jobs.BASE_RETIRED}


@pytest.mark.parametrize("order", ORDERS)
def test_retire_vs_claim_of_a_job_queued_on_that_base(
    order, version, engineer, admin_user, tiny_model_dir, monkeypatch
):
    outcomes = []
    for i in range(ITERATIONS):
        base = fresh_base(tiny_model_dir, admin_user, f"race-claim-{i}")
        job = jobs.create_job(smoke_request(version, base), engineer, enqueue=False)
        claim = ("claim", lambda job=job, i=i: jobs.claim(job.pk, f"worker-{i}"))
        retire = ("retire", lambda base=base: set_status(base, BaseModel.Status.RETIRED, admin_user))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the claim holds the base model's lock, the job running uncommitted
                leading = hold(mp, audit, "record", thread="claim", when=verb_is("training.job.start"))
                claimer, retirer = race(claim, retire, second_waits_for=leading)
            elif order == "second-leads":  # the retire holds it, the model retired uncommitted
                leading = hold(mp, jobs, "cancel_queued_on_base", thread="retire")
                claimer, retirer = race(claim, retire, first_waits_for=leading)
            else:
                claimer, retirer = race(claim, retire)
        assert claimer.error is None and retirer.error is None, (claimer.error, retirer.error)
        job.refresh_from_db()
        base.refresh_from_db()
        assert base.status == BaseModel.Status.RETIRED
        change = retirer.result
        if claimer.result is not None:  # the claim won: the retire found the job running and left it
            outcomes.append("claim")
            assert claimer.result.pk == job.pk
            assert job.state == RUNNING and job.attempt == 1 and job.worker == f"worker-{i}"
            assert job.error_code == "" and not job.cancel_requested
            assert (change.cancelled_jobs, change.running_jobs) == ([], 1)
            assert retire_event(base).data == {"cancelled_jobs": [], "running_jobs": 1}
            assert job_verbs(job) == ["training.job.create", "training.job.start"]
        else:  # the retire won: it cancelled the job, and the claim found it cancelled (or retired)
            outcomes.append("retire")
            assert (change.cancelled_jobs, change.running_jobs) == ([job.pk], 0)
            assert retire_event(base).data == {"cancelled_jobs": [job.pk], "running_jobs": 0}
            assert_cancelled_by_retire(job, base)
    if order == "first-leads":
        assert outcomes == ["claim"] * ITERATIONS
    elif order == "second-leads":
        assert outcomes == ["retire"] * ITERATIONS
    assert not TrainingJob.objects.filter(state=QUEUED).exists()
    assert verify_chain().ok


@pytest.mark.parametrize("order", ORDERS)
def test_retire_vs_launch_on_that_base(order, version, engineer, admin_user, tiny_model_dir, monkeypatch):
    outcomes = []
    for i in range(ITERATIONS):
        base = fresh_base(tiny_model_dir, admin_user, f"race-launch-{i}")
        launch = (
            "launch",
            lambda base=base: jobs.create_job(smoke_request(version, base), engineer, enqueue=False),
        )
        retire = ("retire", lambda base=base: set_status(base, BaseModel.Status.RETIRED, admin_user))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the launch holds the base model's lock, its job inserted uncommitted
                leading = hold(mp, audit, "record", thread="launch", when=verb_is("training.job.create"))
                launcher, retirer = race(launch, retire, second_waits_for=leading)
            elif order == "second-leads":  # the retire holds it; the launch's checks still see it available
                leading = hold(mp, jobs, "cancel_queued_on_base", thread="retire")
                launcher, retirer = race(launch, retire, first_waits_for=leading)
            else:
                launcher, retirer = race(launch, retire)
        assert retirer.error is None, retirer.error
        base.refresh_from_db()
        assert base.status == BaseModel.Status.RETIRED
        change = retirer.result
        created = list(TrainingJob.objects.filter(base_model=base))
        if refused(launcher, jobs.JobRefused):  # the retire committed first: nothing was created
            outcomes.append("refused")
            assert launcher.error.problems == [f"Base model {base.name} is retired; choose an available one."]
            assert created == []
            assert (change.cancelled_jobs, change.running_jobs) == ([], 0)
            assert retire_event(base).data == {"cancelled_jobs": [], "running_jobs": 0}
        else:  # the launch committed first: the retire cancelled its job with the others queued there
            outcomes.append("cancelled")
            assert [j.pk for j in created] == [launcher.result.pk]
            job = created[0]
            assert (change.cancelled_jobs, change.running_jobs) == ([job.pk], 0)
            assert retire_event(base).data == {"cancelled_jobs": [job.pk], "running_jobs": 0}
            assert_cancelled_by_retire(job, base)
    if order == "first-leads":
        assert outcomes == ["cancelled"] * ITERATIONS
    elif order == "second-leads":
        assert outcomes == ["refused"] * ITERATIONS
    assert not TrainingJob.objects.filter(state=QUEUED).exists()
    assert verify_chain().ok


def test_claim_vs_a_finished_job_registering_the_first_version_of_a_new_line_on_that_base(
    version, engineer, admin_user, tiny_model_dir, monkeypatch
):
    """Two workers on one base model: one claims the next queued job (it holds the base model's row lock
    while it records the start) while the other's finished job registers the first version of a new model
    line (it records the line's creation, then inserts the version, whose foreign key to the base model
    takes a key-share lock on that row). Both finish; neither waits on the other for ever."""
    for i in range(ITERATIONS):
        base = fresh_base(tiny_model_dir, admin_user, f"race-register-{i}")
        finished = jobs.create_job(smoke_request(version, base), engineer, enqueue=False)
        TrainingJob.objects.filter(pk=finished.pk).update(
            model_name=f"race-line-{i}", state=TrainingJob.State.SUCCEEDED, artifacts_dir=f"/artifacts/{i}"
        )
        finished.refresh_from_db()
        queued = jobs.create_job(smoke_request(version, base), engineer, enqueue=False)
        with monkeypatch.context() as mp:
            leading = hold(mp, audit, "record", thread="claim", when=verb_is("training.job.start"))
            claimer, registrar = race(
                ("claim", lambda queued=queued: jobs.claim(queued.pk, "worker-a")),
                ("register", lambda finished=finished: register_job_result(finished)),
                second_waits_for=leading,
            )
        assert claimer.error is None and registrar.error is None, (claimer.error, registrar.error)
        assert claimer.result.pk == queued.pk and claimer.result.state == RUNNING
        assert registrar.result.registered_model.name == f"race-line-{i}" and registrar.result.number == 1
        assert job_verbs(queued) == ["training.job.create", "training.job.start"]
    assert verify_chain().ok


# =====================================================================================================
# The approval gate
# =====================================================================================================


def pending_pair(world: World, alias: str) -> tuple[PromotionRequest, PromotionRequest]:
    """Two versions with passing evidence, each with a pending request for `alias`."""
    versions = [world.version(), world.version()]
    for v in versions:
        world.good_run(v)
    first, second = (gate.request_promotion(world.requester, v, alias) for v in versions)
    return first, second


def alias_changes(world: World, alias: str) -> list[AliasChange]:
    return list(AliasChange.objects.filter(registered_model=world.line, alias=alias))


def assert_approved_alone(world: World, alias: str, approved: PromotionRequest) -> None:
    """`approved` moved `alias` once, to its version, with one approval event and one webhook event."""
    approved.refresh_from_db()
    assert approved.status == PromotionRequest.Status.APPROVED and approved.previous_version is None
    changes = alias_changes(world, alias)
    assert [(c.from_version_id, c.to_version_id, c.promotion_id) for c in changes] == [
        (None, approved.version_id, approved.pk)
    ]
    assert Alias.objects.get(registered_model=world.line, name=alias).version_id == approved.version_id
    assert AuditEvent.objects.filter(verb="eval.promotion.approve", data__alias=alias).count() == 1
    assert WebhookEvent.objects.filter(payload__alias=alias).count() == 1


@pytest.fixture
def second_admin(make_user):
    return make_user("bea", ADMIN)


@pytest.mark.parametrize("order", ORDERS)
def test_two_admins_approve_two_requests_for_one_alias_at_once(order, world, second_admin, monkeypatch):
    winners = []
    for i in range(ITERATIONS):
        alias = f"race-{i}"
        requests = pending_pair(world, alias)
        one = ("approve-1", lambda r=requests[0]: gate.approve(world.approver, r))
        two = ("approve-2", lambda r=requests[1]: gate.approve(second_admin, r))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # approval 1 holds the line's and its request's locks
                leading = hold(mp, gate, "evaluate_policy", thread="approve-1")
                racers = race(one, two, second_waits_for=leading)
            elif order == "second-leads":
                leading = hold(mp, gate, "evaluate_policy", thread="approve-2")
                racers = race(one, two, first_waits_for=leading)
            else:
                racers = race(one, two)
        losers = [r for r in racers if refused(r, gate.GateRefused)]
        assert len(losers) == 1, [(r.name, r.error) for r in racers]
        (loser,) = losers
        (winner,) = [r for r in racers if r is not loser]
        winners.append(winner.name)
        approved = winner.result
        other = requests[1] if approved.pk == requests[0].pk else requests[0]
        assert str(loser.error).startswith(
            f"Promotion request {other.pk} is already cancelled. Superseded: promotion {approved.pk} "
            f"moved {alias} to"
        )
        assert approved.superseded_ids == [other.pk]
        assert_approved_alone(world, alias, approved)
        other.refresh_from_db()
        assert other.status == PromotionRequest.Status.CANCELLED
        assert other.decision_comment.startswith(f"Superseded: promotion {approved.pk} moved {alias}")
        assert audit_verbs(approved) == ["eval.promotion.request", "eval.promotion.approve"]
        assert audit_verbs(other) == ["eval.promotion.request", "eval.promotion.superseded"]
    if order == "first-leads":
        assert winners == ["approve-1"] * ITERATIONS
    elif order == "second-leads":
        assert winners == ["approve-2"] * ITERATIONS
    assert not PromotionRequest.objects.filter(status=PromotionRequest.Status.PENDING).exists()
    assert verify_chain().ok


@pytest.mark.parametrize("order", ORDERS)
def test_approve_vs_withdraw_of_the_same_request(order, world, monkeypatch):
    outcomes = []
    for i in range(ITERATIONS):
        alias = f"race-{i}"
        v = world.version()
        world.good_run(v)
        req = gate.request_promotion(world.requester, v, alias)
        approve = ("approve", lambda req=req: gate.approve(world.approver, req))
        withdraw = ("withdraw", lambda req=req: gate.cancel(world.requester, req))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the approval holds the line's and the request's locks
                leading = hold(mp, gate, "evaluate_policy", thread="approve")
                approver, withdrawer = race(approve, withdraw, second_waits_for=leading)
            elif order == "second-leads":  # the withdrawal holds the request's lock
                leading = hold(mp, gate, "_check_pending", thread="withdraw")
                approver, withdrawer = race(approve, withdraw, first_waits_for=leading)
            else:
                approver, withdrawer = race(approve, withdraw)
        req.refresh_from_db()
        if refused(withdrawer, gate.GateRefused):  # approved first
            outcomes.append("approved")
            assert approver.error is None, approver.error
            assert str(withdrawer.error) == f"Promotion request {req.pk} is already approved."
            assert_approved_alone(world, alias, req)
            assert audit_verbs(req) == ["eval.promotion.request", "eval.promotion.approve"]
        else:  # withdrawn first: the approval is refused and the alias never existed
            outcomes.append("withdrawn")
            assert refused(approver, gate.GateRefused), "both the approval and the withdrawal went through"
            assert str(approver.error) == f"Promotion request {req.pk} is already cancelled."
            assert req.status == PromotionRequest.Status.CANCELLED and req.decided_by == world.requester
            assert alias_changes(world, alias) == []
            assert not Alias.objects.filter(registered_model=world.line, name=alias).exists()
            assert not WebhookEvent.objects.filter(payload__alias=alias).exists()
            assert audit_verbs(req) == ["eval.promotion.request", "eval.promotion.cancel"]
    if order == "first-leads":
        assert outcomes == ["approved"] * ITERATIONS
    elif order == "second-leads":
        assert outcomes == ["withdrawn"] * ITERATIONS
    assert verify_chain().ok


@pytest.mark.parametrize("how", ["withdraw", "reject"])
@pytest.mark.parametrize("order", ORDERS)
def test_approve_one_request_vs_deciding_the_other_for_the_same_alias(
    order, how, world, second_admin, monkeypatch
):
    """Approving request A supersedes the other pending request B for the alias, while B's requester
    withdraws it (or a second admin rejects it): B ends withdrawn/rejected or superseded, A is approved
    either way, and neither waits on the other for ever."""
    verb = {"withdraw": "eval.promotion.cancel", "reject": "eval.promotion.reject"}[how]
    status = {"withdraw": PromotionRequest.Status.CANCELLED, "reject": PromotionRequest.Status.REJECTED}[how]
    outcomes = []
    for i in range(ITERATIONS):
        alias = f"race-{i}"
        a, b = pending_pair(world, alias)
        approve = ("approve", lambda a=a: gate.approve(world.approver, a))
        if how == "withdraw":
            decide = (how, lambda b=b: gate.cancel(world.requester, b))
        else:
            decide = (
                how,
                lambda b=b: gate.reject(second_admin, b, "Not this one: the other version is better."),
            )
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the approval holds every lock it takes, B's included
                leading = hold(mp, webhooks, "enqueue_event", thread="approve")
                approver, decider = race(approve, decide, second_waits_for=leading)
            elif order == "second-leads":  # the withdrawal/rejection holds B's lock
                leading = hold(mp, gate, "_check_pending", thread=how)
                approver, decider = race(approve, decide, first_waits_for=leading)
            else:
                approver, decider = race(approve, decide)
        assert approver.error is None, approver.error
        assert approver.result.pk == a.pk
        assert_approved_alone(world, alias, a)
        assert audit_verbs(a) == ["eval.promotion.request", "eval.promotion.approve"]
        b.refresh_from_db()
        if refused(decider, gate.GateRefused):  # superseded by the approval first
            outcomes.append("superseded")
            assert str(decider.error).startswith(
                f"Promotion request {b.pk} is already cancelled. Superseded: promotion {a.pk}"
            )
            assert approver.result.superseded_ids == [b.pk]
            assert b.status == PromotionRequest.Status.CANCELLED
            assert audit_verbs(b) == ["eval.promotion.request", "eval.promotion.superseded"]
        else:  # withdrawn/rejected first: the approval had nothing left to supersede
            outcomes.append(how)
            assert approver.result.superseded_ids == []
            assert b.status == status and not b.decision_comment.startswith("Superseded")
            assert audit_verbs(b) == ["eval.promotion.request", verb]
    if order == "first-leads":
        assert outcomes == ["superseded"] * ITERATIONS
    elif order == "second-leads":
        assert outcomes == [how] * ITERATIONS
    assert not PromotionRequest.objects.filter(status=PromotionRequest.Status.PENDING).exists()
    assert verify_chain().ok
