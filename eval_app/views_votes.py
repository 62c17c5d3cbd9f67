"""Blind review pages (reviewers) and vote statistics (engineers). Thin: parse, authorise, call a
service, render.

Blindness: the comparison page shows the prompt and answers A and B only. It names no model, version,
run or generation; the run a reviewer works on is kept in their session, not in the page. The identity
of each side is shown on the "done" page, which exists only once the reviewer's vote is stored.
"""

from __future__ import annotations

import time

from django.contrib import messages
from django.core import signing
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from studio.numbers import form_id
from studio.roles import ADMIN, ENGINEER, REVIEWER, role_required

from . import stats
from .models import EvalRun, Vote
from .services import evaluation, voting

SESSION_RUN = "review_run"


def _session_run(request) -> EvalRun | None:
    run_id = request.session.get(SESSION_RUN)
    if not run_id:
        return None
    return EvalRun.objects.filter(pk=run_id).first()


def _access_or_404(request, pk: int) -> voting.Access:
    found = voting.access(request.user, pk)
    if found is None:
        raise Http404("This comparison is not assigned to you. Open the review queue to get one.")
    return found


# --- reviewers ---------------------------------------------------------------------------------------


@role_required(REVIEWER)
def reviews(request):
    rows = voting.queue(request.user)
    held = voting.current_assignment(request.user)
    context = {
        "rows": rows,
        "held": held,
        "done": sum(r.done for r in rows),
        "available": sum(r.available for r in rows),
    }
    return render(request, "eval/votes/queue.html", context)


@role_required(REVIEWER)
def review_next(request):
    """POST: claim the next comparison (optionally of one run) and open it. GET: back to the open one."""
    if request.method != "POST":
        held = voting.current_assignment(request.user, _session_run(request))
        return redirect("eval:review", held.comparison_id) if held else redirect("eval:reviews")
    if "run" in request.POST:
        # empty means "any run"; anything else must name an evaluation that exists: a damaged or stale
        # form is refused in words rather than silently widened to every run
        raw = request.POST.get("run", "").strip()
        if not raw:
            request.session.pop(SESSION_RUN, None)
        else:
            run_id = form_id(raw)
            if run_id is None or not EvalRun.objects.filter(pk=run_id).exists():
                messages.error(
                    request,
                    "That evaluation could not be found (it may have been deleted, or the form was "
                    "damaged). Pick an evaluation from the list below.",
                )
                return redirect("eval:reviews")
            request.session[SESSION_RUN] = run_id
    run = _session_run(request)
    comparison = voting.claim_next(request.user, run)
    if comparison is None:
        if run is not None:
            messages.info(request, "Nothing is left for you to review in that evaluation. Thank you!")
        else:
            messages.info(request, "Nothing is left for you to review right now. Thank you!")
        return redirect("eval:reviews")
    return redirect("eval:review", comparison.pk)


SHOWN_AT_SALT = "eval.review.shown_at"


def _seconds_since_shown(token: str) -> float | None:
    """How long the reviewer looked at the comparison, from the time the page was rendered, which the
    form carries signed by the server: a value the browser made up is not recorded (None)."""
    try:
        shown_at = float(signing.loads(token, salt=SHOWN_AT_SALT, max_age=86400))
    except (signing.BadSignature, TypeError, ValueError):
        return None
    return max(0.0, time.time() - shown_at)


@role_required(REVIEWER)
def review(request, pk: int):
    found = _access_or_404(request, pk)
    if found.voted:
        if request.method == "POST":  # a second submit (double click, back button): the first vote stands
            messages.info(request, voting.ALREADY_VOTED)
        return redirect("eval:review_done", pk)
    comparison = found.comparison
    error = ""
    if request.method == "POST":
        seconds = _seconds_since_shown(request.POST.get("shown_at", ""))
        try:
            voting.cast_vote(
                request.user,
                comparison,
                request.POST.get("choice", ""),
                comment=request.POST.get("comment", ""),
                seconds=seconds,
            )
        except voting.VoteRefused as exc:
            if Vote.objects.filter(comparison=comparison, reviewer=request.user).exists():
                messages.info(request, str(exc))
                return redirect("eval:review_done", pk)
            error = str(exc)
        else:
            return redirect("eval:review_done", pk)
    answer_a, answer_b = comparison.generation_a, comparison.generation_b
    progress = voting.progress(request.user, comparison.run)
    context = {
        "comparison": comparison,
        "prompt": [m for m in (answer_a.prompt or []) if isinstance(m, dict)],
        # personal data found in either answer masked (both sides are scanned alike)
        "answer_a": evaluation.leak_segments(answer_a),
        "answer_b": evaluation.leak_segments(answer_b),
        "choices": [
            ("a", "1", "A is better"),
            ("b", "2", "B is better"),
            ("tie", "3", "Tie"),
            ("both_bad", "4", "Both bad"),
        ],
        "selected": request.POST.get("choice", "") if request.method == "POST" else "",
        "comment": request.POST.get("comment", "") if request.method == "POST" else "",
        "shown_at": signing.dumps(f"{time.time():.3f}", salt=SHOWN_AT_SALT),
        "number": progress.done + 1,
        "of": progress.done + 1 + progress.available,
        "error": error,
    }
    return render(request, "eval/votes/review.html", context, status=400 if error else 200)


@role_required(REVIEWER)
@require_POST
def review_skip(request, pk: int):
    found = _access_or_404(request, pk)
    if found.voted:
        return redirect("eval:review_done", pk)
    try:
        voting.skip(request.user, found.comparison)
    except voting.VoteRefused as exc:  # a vote on it committed meanwhile (another tab): that vote stands
        messages.info(request, str(exc))
        return redirect("eval:review_done", pk)
    messages.info(request, "Skipped. You will not be shown that comparison again.")
    comparison = voting.claim_next(request.user, _session_run(request))
    if comparison is None:
        messages.info(request, "Nothing else is left for you to review right now.")
        return redirect("eval:reviews")
    return redirect("eval:review", comparison.pk)


@role_required(REVIEWER)
def review_done(request, pk: int):
    """After the vote is stored: which side was which model, then on to the next comparison."""
    found = _access_or_404(request, pk)
    if not found.voted:
        return redirect("eval:review", pk)
    comparison, vote = found.comparison, found.vote
    run = comparison.run
    candidate, baseline = str(run.candidate), run.baseline_label
    progress = voting.progress(request.user, _session_run(request))
    context = {
        "comparison": comparison,
        "vote": vote,
        "side_a": baseline if comparison.swapped else candidate,
        "side_b": candidate if comparison.swapped else baseline,
        "candidate": candidate,
        "baseline": baseline,
        "progress": progress,
    }
    return render(request, "eval/votes/done.html", context)


# --- statistics (engineers, admins) ------------------------------------------------------------------


def _curves(summary: stats.RunSummary) -> tuple[dict, dict, str]:
    """Votes over time (cumulative, since the first vote, in minutes, hours or days by the span), the
    running win-rate by vote, and the time unit."""
    if not summary.timeline:
        return {}, {}, "hours"
    start = summary.timeline[0][0]
    span = (summary.timeline[-1][0] - start).total_seconds()
    unit, seconds = (
        ("minutes", 60) if span < 7200 else ("hours", 3600) if span < 3 * 86400 else ("days", 86400)
    )
    cumulative, running = [], []
    wins = decisive = 0.0
    for n, (at, outcome) in enumerate(summary.timeline, start=1):
        cumulative.append(((at - start).total_seconds() / seconds, n))
        if outcome != "both_bad":
            decisive += 1
            wins += {"candidate": 1.0, "tie": 0.5}.get(outcome, 0.0)
            running.append((n, wins / decisive))
    return {"votes": cumulative}, ({"win-rate": running} if running else {}), unit


@role_required(ENGINEER, ADMIN)
def run_stats(request, pk: int):
    run = get_object_or_404(
        EvalRun.objects.select_related(
            "candidate__registered_model", "baseline_version", "baseline_base_model"
        ),
        pk=pk,
    )
    summary = stats.run_summary(run)
    votes_curve, winrate_curve, unit = _curves(summary)
    context = {
        "run": run,
        "summary": summary,
        "votes_curve": votes_curve,
        "winrate_curve": winrate_curve,
        "time_axis": f"{unit} since the first vote",
        "rows": stats.leaderboard(run.candidate.registered_model),
        "line": run.candidate.registered_model,
    }
    return render(request, "eval/votes/stats.html", context)
