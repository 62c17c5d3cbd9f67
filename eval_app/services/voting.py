"""Blind voting: claim the next comparison slot, cast a vote, skip.

Slots. A comparison wants `votes_wanted` votes (K, or two for the overlap share). A slot is taken by a
vote or by an active assignment (not skipped, not expired; an assignment is closed — its expiry set to
the vote's time — when its reviewer votes). A comparison is open while
votes_count + active assignments < votes_wanted.

Claiming (Label Studio's next_task pattern). Candidate comparisons are read with
`SELECT … FOR UPDATE SKIP LOCKED` (on the comparison rows only), one at a time: concurrent reviewers
skip a row another claimer holds. Holding the row lock, the slot count is read again with a fresh
statement — under READ COMMITTED that sees every claim committed by earlier holders of the lock, so two
reviewers can never take the same last slot even when their first read was older than a commit. Voting
updates the same row (votes_count = votes_count + 1), so it serialises with claims on that comparison.
SQLite has no row locks: its transactions here start with BEGIN IMMEDIATE (settings), which runs the
whole claim one at a time — slower under load, equally correct.

Audit: votes and skips are audited ("eval.vote", "eval.vote.skip": ids only, never the comment). A claim
is an expiring lease whose record is the Assignment row itself; it is not audited.

Who may vote on a run (blindness; all under STUDIO_VOTE_EXCLUDE_TRAINERS). Nobody who already knows
which answer is whose: not the people who trained or registered the candidate or the baseline version,
not the engineer who created the run, and not anyone who opened the run's page — its sample table and
flagged outputs label the candidate's and the baseline's answers. Opening that page is recorded once
per person and run as an "eval.run.unblind" audit event (`mark_unblinded`; found through the indexed
verb and actor columns); the claim service, the vote service and the review queue all read it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, F, IntegerField, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from studio import audit
from studio.models import AuditEvent

from ..models import Assignment, Comparison, EvalRun, Vote

log = logging.getLogger(__name__)

MAX_CLAIM_TRIES = 25
COMMENT_MAX = 2000


class VoteRefused(Exception):
    """A vote or skip that cannot be accepted; the message says why in plain words."""


def _claim_minutes() -> int:
    return max(1, int(getattr(settings, "STUDIO_VOTE_CLAIM_MINUTES", 30)))


def _active_assignments(now):
    return Assignment.objects.filter(skipped=False, expires_at__gt=now)


def _active_count_subquery(now):
    return Coalesce(
        Subquery(
            _active_assignments(now)
            .filter(comparison=OuterRef("pk"))
            .order_by()
            .values("comparison")
            .annotate(n=Count("id"))
            .values("n")[:1],
            output_field=IntegerField(),
        ),
        Value(0),
    )


def trained_by(run: EvalRun, user) -> bool:
    """Whether `user` trained (or registered) the candidate or the baseline version of `run`."""
    for version in (run.candidate, run.baseline_version):
        if version is None:
            continue
        if version.created_by_id == user.pk:
            return True
        if version.training_job_id and version.training_job.created_by_id == user.pk:
            return True
    return False


UNBLIND_VERB = "eval.run.unblind"


def exclusions_on() -> bool:
    return bool(getattr(settings, "STUDIO_VOTE_EXCLUDE_TRAINERS", True))


def unblinded_runs(user) -> list[int]:
    """Ids of the runs whose labelled page `user` has opened (one query on the audit log's indexes)."""
    ids = AuditEvent.objects.filter(verb=UNBLIND_VERB, actor=user, object_type="evalrun").values_list(
        "object_id", flat=True
    )
    return [int(i) for i in ids if i.isdigit()]


def has_unblinded(run: EvalRun, user) -> bool:
    return AuditEvent.objects.filter(
        verb=UNBLIND_VERB, actor=user, object_type="evalrun", object_id=str(run.pk)
    ).exists()


def mark_unblinded(run: EvalRun, user) -> bool:
    """Record that `user` saw which answer of `run` is whose (its page), once per person and run, and
    give back the slots they hold on it: they vote on it no more. True when newly recorded."""
    if not getattr(user, "is_authenticated", False) or has_unblinded(run, user):
        return False
    now = timezone.now()
    with transaction.atomic():
        released = (
            _active_assignments(now)
            .filter(reviewer=user, comparison__run=run)
            .exclude(comparison__votes__reviewer=user)
        )
        # the slots are given back (their rows locked) before the audit event takes the audit log's lock:
        # a vote or skip of this person in another tab holds its assignment's row and then records its
        # own event, so waiting for that row while holding the audit lock would deadlock with it
        Assignment.objects.filter(pk__in=list(released.values_list("pk", flat=True))).update(expires_at=now)
        audit.record(user, UNBLIND_VERB, run)
    return True


def _exclude_not_blind(queryset, reviewer, prefix: str = ""):
    """`queryset` (of runs, or of rows reaching a run through `prefix`) without the runs `reviewer`
    cannot vote on blind: trained or registered one of the models, created the run, opened its page."""
    if not exclusions_on():
        return queryset
    return (
        queryset.exclude(**{f"{prefix}candidate__created_by": reviewer})
        .exclude(**{f"{prefix}candidate__training_job__created_by": reviewer})
        .exclude(**{f"{prefix}baseline_version__created_by": reviewer})
        .exclude(**{f"{prefix}baseline_version__training_job__created_by": reviewer})
        .exclude(**{f"{prefix}created_by": reviewer})
        .exclude(**{f"{prefix}pk__in": unblinded_runs(reviewer)})
    )


def not_blind_reason(run: EvalRun, user) -> str:
    """Why `user`'s vote on `run` would not be blind, in plain words; "" when it would be."""
    if not exclusions_on():
        return ""
    if trained_by(run, user):
        return "You trained one of these models, so your vote would not be blind."
    if run.created_by_id is not None and run.created_by_id == user.pk:
        return "You created this evaluation run, so your vote would not be blind."
    if has_unblinded(run, user):
        return (
            "You opened this evaluation run's page, which shows which answer is whose, "
            "so your vote would not be blind."
        )
    return ""


def runs_open_to(reviewer, run=None) -> list[int]:
    """Ids of the succeeded runs `reviewer` may vote on: with STUDIO_VOTE_EXCLUDE_TRAINERS, not those
    whose candidate or baseline version they trained or registered, that they created, or whose page
    they opened (see the module notes). (Small queries on runs and the audit log, so the
    per-comparison queries below need no joins.)"""
    runs = EvalRun.objects.filter(state=EvalRun.State.SUCCEEDED)
    if run is not None:
        runs = runs.filter(pk=run.pk)
    runs = _exclude_not_blind(runs, reviewer)
    return list(runs.values_list("pk", flat=True))


def eligible_comparisons(reviewer, run=None):
    """Comparisons of the runs open to `reviewer` that they may still vote on (open slots not
    considered): not voted and not skipped by them."""
    skipped = Assignment.objects.filter(reviewer=reviewer, skipped=True).values("comparison")
    return (
        Comparison.objects.filter(run_id__in=runs_open_to(reviewer, run))
        .exclude(votes__reviewer=reviewer)
        .exclude(pk__in=skipped)
    )


def _open_phases(reviewer, run=None, now=None):
    """Eligible comparisons with an open slot, as two disjoint querysets in claim order.

    1. started: already voted or claimed by someone (partly filled overlap items, and slots coming back
       from expired claims), so that overlap items get their second vote and agreement can be measured;
    2. fresh: no vote and no active claim — open by definition, found with a cheap anti-join instead of
       counting claims row by row.
    Each is ordered older runs first (lower id), then the run's own order."""
    now = now or timezone.now()
    held = _active_assignments(now).filter(reviewer=reviewer).values("comparison")
    base = eligible_comparisons(reviewer, run).exclude(pk__in=held)
    claimed = Exists(_active_assignments(now).filter(comparison=OuterRef("pk")))
    order = ("run_id", "position")  # the (run, position) unique index
    started = (
        base.filter(Q(votes_count__gt=0) | claimed)
        .annotate(active=_active_count_subquery(now))
        .filter(votes_count__lt=F("votes_wanted") - F("active"))
        .order_by(*order)
    )
    fresh = base.filter(votes_count=0, votes_wanted__gt=0).exclude(claimed).order_by(*order)
    return started, fresh


def open_count(reviewer, run=None) -> int:
    """How many comparisons `reviewer` could still claim (the one they hold now not counted)."""
    started, fresh = _open_phases(reviewer, run)
    return started.count() + fresh.count()


def current_assignment(reviewer, run=None) -> Assignment | None:
    """The reviewer's unexpired, unvoted, unskipped assignment (the page they left), if any, on a run
    they may still vote on blind."""
    now = timezone.now()
    qs = _exclude_not_blind(
        _active_assignments(now)
        .filter(reviewer=reviewer, comparison__run__state=EvalRun.State.SUCCEEDED)
        .exclude(comparison__votes__reviewer=reviewer),
        reviewer,
        prefix="comparison__run__",
    )
    qs = qs.select_related("comparison").order_by("claimed_at", "id")
    if run is not None:
        qs = qs.filter(comparison__run=run)
    return qs.first()


def _slots_taken(comparison_id: int, now, exclude_reviewer=None) -> tuple[int, int]:
    """(votes_count, active assignments) read with a fresh statement, and votes_wanted."""
    row = Comparison.objects.filter(pk=comparison_id).values("votes_count", "votes_wanted").get()
    active = _active_assignments(now).filter(comparison_id=comparison_id)
    if exclude_reviewer is not None:
        active = active.exclude(reviewer=exclude_reviewer)
    return row["votes_count"] + active.count(), row["votes_wanted"]


def claim_next(reviewer, run=None) -> Comparison | None:
    """The comparison `reviewer` should vote on next, with a slot reserved for them; None when nothing is
    left. A reviewer who already holds an assignment gets that one back (a reload never claims twice)."""
    held = current_assignment(reviewer, run)
    if held is not None:
        return held.comparison
    now = timezone.now()
    expires = now + timedelta(minutes=_claim_minutes())
    tried: list[int] = []
    with transaction.atomic():
        for attempt in range(MAX_CLAIM_TRIES):
            phases = [qs.exclude(pk__in=tried) if tried else qs for qs in _open_phases(reviewer, run, now)]
            comparison = None
            for candidates in phases:
                comparison = candidates.select_for_update(skip_locked=True, of=("self",)).first()
                if comparison is not None:
                    break
            if comparison is None:
                if not any(candidates.exists() for candidates in phases):
                    return None
                # every open comparison is locked by a claim in progress right now (milliseconds):
                # wait for those claims to commit, then look again (each statement sees new commits)
                time.sleep(0.005 * (attempt + 1))
                continue
            taken, wanted = _slots_taken(comparison.pk, now)
            if taken >= wanted:  # filled by a claim committed after our first read
                tried.append(comparison.pk)
                continue
            # an expired (never skipped) assignment of this reviewer is renewed rather than duplicated
            updated = Assignment.objects.filter(
                comparison=comparison, reviewer=reviewer, skipped=False
            ).update(claimed_at=now, expires_at=expires)
            if not updated:
                Assignment.objects.create(comparison=comparison, reviewer=reviewer, expires_at=expires)
            log.info("claimed comparison %s by reviewer %s", comparison.pk, reviewer.pk)
            return comparison
    log.warning("reviewer %s found no free slot after %s tries", reviewer.pk, MAX_CLAIM_TRIES)
    return None


@dataclass
class Access:
    """What a reviewer may do with one comparison."""

    comparison: Comparison
    assignment: Assignment | None
    vote: Vote | None

    @property
    def voted(self) -> bool:
        return self.vote is not None


def access(reviewer, comparison_id: int) -> Access | None:
    """The reviewer's standing on a comparison: None unless they voted on it or hold an unskipped
    assignment for it (an expired one is renewed when its slot is still free) on a run they can still
    judge blind. Nobody may open a comparison assigned to someone else."""
    comparison = (
        Comparison.objects.select_related(
            "run__candidate__training_job", "run__baseline_version__training_job"
        )
        .filter(pk=comparison_id)
        .first()
    )
    if comparison is None:
        return None
    vote = Vote.objects.filter(comparison=comparison, reviewer=reviewer).first()
    assignment = Assignment.objects.filter(comparison=comparison, reviewer=reviewer).first()
    if vote is not None:
        return Access(comparison, assignment, vote)
    if assignment is None or assignment.skipped or comparison.run.state != EvalRun.State.SUCCEEDED:
        return None
    if not_blind_reason(comparison.run, reviewer):  # e.g. opened the run's page after claiming
        return None
    now = timezone.now()
    if assignment.expires_at <= now:
        with transaction.atomic():
            Comparison.objects.select_for_update(of=("self",)).filter(pk=comparison.pk).first()
            # a vote closes the claim and inserts the vote in one transaction, holding this row lock: a
            # vote of this reviewer (another tab) that committed after the vote was looked up above shows
            # up here, and it is their vote, not a slot someone else filled
            vote = Vote.objects.filter(comparison=comparison, reviewer=reviewer).first()
            if vote is not None:
                return Access(comparison, assignment, vote)
            taken, wanted = _slots_taken(comparison.pk, now, exclude_reviewer=reviewer)
            if taken >= wanted:
                return None
            assignment.claimed_at = now
            assignment.expires_at = now + timedelta(minutes=_claim_minutes())
            assignment.save(update_fields=["claimed_at", "expires_at"])
    return Access(comparison, assignment, None)


def resolve_outcome(choice: str, swapped: bool) -> str:
    """The candidate's outcome for a click on side A or B (`swapped`: the candidate is shown as B)."""
    if choice == Vote.Choice.A:
        return Vote.Outcome.BASELINE if swapped else Vote.Outcome.CANDIDATE
    if choice == Vote.Choice.B:
        return Vote.Outcome.CANDIDATE if swapped else Vote.Outcome.BASELINE
    if choice == Vote.Choice.TIE:
        return Vote.Outcome.TIE
    if choice == Vote.Choice.BOTH_BAD:
        return Vote.Outcome.BOTH_BAD
    raise VoteRefused("Choose one of: A is better, B is better, tie, or both bad.")


ALREADY_VOTED = "You already voted on this comparison; your first vote counts. Go on to the next one."


def cast_vote(reviewer, comparison: Comparison, choice: str, comment: str = "", seconds=None) -> Vote:
    """Store one reviewer's vote. Needs the reviewer's assignment for the comparison, or a free slot.

    Raises VoteRefused with a plain message for a second vote by the same reviewer (also when two
    submits race: the database constraint decides), a skipped or full comparison, an unfinished run, or
    a run the reviewer cannot judge blind (trained a model, created the run, opened its page)."""
    outcome = resolve_outcome(choice, comparison.swapped)
    comment = (comment or "").strip()[:COMMENT_MAX]
    if "\x00" in comment:  # no database text column stores it
        raise VoteRefused("The comment contains a NUL character (\\u0000); remove it and vote again.")
    try:
        seconds = float(seconds) if seconds not in (None, "") else None
    except (TypeError, ValueError):
        seconds = None
    if seconds is not None and not (0 <= seconds < 86400):
        seconds = None
    now = timezone.now()
    try:
        with transaction.atomic():
            locked = (
                Comparison.objects.select_for_update(of=("self",))
                .select_related("run__candidate__training_job", "run__baseline_version__training_job")
                .filter(pk=comparison.pk)
                .first()
            )
            if locked is None:
                raise VoteRefused("This comparison no longer exists. Go back to the review queue.")
            run = locked.run
            if run.state != EvalRun.State.SUCCEEDED:
                raise VoteRefused("This evaluation run is not open for votes.")
            if Vote.objects.filter(comparison=locked, reviewer=reviewer).exists():
                raise VoteRefused(ALREADY_VOTED)
            reason = not_blind_reason(run, reviewer)
            if reason:
                raise VoteRefused(reason)
            assignment = Assignment.objects.filter(comparison=locked, reviewer=reviewer).first()
            if assignment is not None and assignment.skipped:
                raise VoteRefused("You skipped this comparison. Go on to the next one.")
            holds_slot = assignment is not None and assignment.expires_at > now
            if not holds_slot:
                taken, wanted = _slots_taken(locked.pk, now, exclude_reviewer=reviewer)
                if taken >= wanted:
                    raise VoteRefused(
                        "Your time on this comparison ran out and others have voted on it since. "
                        "Go on to the next one."
                    )
            with transaction.atomic():  # a savepoint: a racing double submit ends here, not in a 500
                vote = Vote.objects.create(
                    comparison=locked,
                    reviewer=reviewer,
                    choice=choice,
                    outcome=outcome,
                    comment=comment,
                    seconds=seconds,
                )
            Comparison.objects.filter(pk=locked.pk).update(votes_count=F("votes_count") + 1)
            if assignment is not None:
                Assignment.objects.filter(pk=assignment.pk).update(
                    expires_at=now
                )  # closed: the vote holds it
            audit.record(reviewer, "eval.vote", locked, vote=vote.pk, run=run.pk)
    except IntegrityError:
        raise VoteRefused(ALREADY_VOTED)
    log.info("vote %s on comparison %s by reviewer %s", vote.pk, comparison.pk, reviewer.pk)
    return vote


def skip(reviewer, comparison: Comparison) -> None:
    """Give the slot back; this reviewer will not be offered this comparison again."""
    with transaction.atomic():
        # the comparison's row lock serialises a skip with a vote on it (cast_vote locks it too): a vote
        # and a skip of the same comparison (two tabs) never both go through
        Comparison.objects.select_for_update(no_key=True, of=("self",)).filter(pk=comparison.pk).first()
        if Vote.objects.filter(comparison=comparison, reviewer=reviewer).exists():
            raise VoteRefused("You already voted on this comparison.")
        assignment, created = Assignment.objects.get_or_create(
            comparison=comparison,
            reviewer=reviewer,
            defaults={"expires_at": timezone.now(), "skipped": True},
        )
        if not created:
            if assignment.skipped:
                return
            assignment.skipped = True
            assignment.save(update_fields=["skipped"])
        audit.record(reviewer, "eval.vote.skip", comparison, run=comparison.run_id)


@dataclass
class Progress:
    done: int  # votes this reviewer cast (in the run, or everywhere)
    available: int  # comparisons with a free slot this reviewer may still claim

    @property
    def total(self) -> int:
        return self.done + self.available


def progress(reviewer, run=None) -> Progress:
    """Votes cast and comparisons still claimable (the one the reviewer holds now is not counted)."""
    votes = Vote.objects.filter(reviewer=reviewer)
    if run is not None:
        votes = votes.filter(comparison__run=run)
    return Progress(done=votes.count(), available=open_count(reviewer, run))


@dataclass
class QueueRow:
    run: EvalRun
    done: int
    available: int
    comparisons: int

    @property
    def total(self) -> int:
        return self.done + self.available


def queue(reviewer) -> list[QueueRow]:
    """Succeeded runs where the reviewer has voted or can still vote, with their progress (oldest first)."""
    now = timezone.now()
    open_by_run: Counter = Counter()
    for phase in _open_phases(reviewer, now=now):
        open_by_run.update(
            dict(phase.order_by().values("run").annotate(n=Count("id")).values_list("run", "n"))
        )
    done_by_run = dict(
        Vote.objects.filter(reviewer=reviewer, comparison__run__state=EvalRun.State.SUCCEEDED)
        .order_by()
        .values("comparison__run")
        .annotate(n=Count("id"))
        .values_list("comparison__run", "n")
    )
    held = current_assignment(reviewer)
    if held is not None:  # the page the reviewer left open still counts as available work
        open_by_run[held.comparison.run_id] = open_by_run.get(held.comparison.run_id, 0) + 1
    run_ids = set(open_by_run) | set(done_by_run)
    runs = (
        EvalRun.objects.filter(pk__in=run_ids)
        .select_related("dataset_version__dataset")
        .order_by("created_at")
    )
    sizes = dict(
        Comparison.objects.filter(run__in=run_ids)
        .order_by()
        .values("run")
        .annotate(n=Count("id"))
        .values_list("run", "n")
    )
    return [
        QueueRow(run, done_by_run.get(run.pk, 0), open_by_run.get(run.pk, 0), sizes.get(run.pk, 0))
        for run in runs
    ]
