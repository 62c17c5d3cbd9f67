"""Blind voting: claiming slots (also under concurrency), casting votes, skipping, trainer exclusion,
the blind page, keyboard markup and who may open which page."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.urls import reverse
from django.utils import timezone
from test_eval_stats import World, put_votes
from test_eval_stats import world as world  # noqa: F401 - the fixture

from eval_app.models import Assignment, Comparison, EvalRun, Vote
from eval_app.services import voting
from studio.models import AuditEvent
from training_app.models import TrainingJob


@pytest.fixture
def reviewers(make_user):
    return [make_user(f"rev{i}", "reviewer") for i in range(3)]


def claims_of(run):
    return Counter(
        Assignment.objects.filter(comparison__run=run, skipped=False).values_list("comparison", flat=True)
    )


# =====================================================================================================
# Claiming
# =====================================================================================================


def test_claim_reserves_a_slot_and_a_reload_gets_the_same_one(world: World, reviewers):
    run = world.run(world.version(1), n=3)
    first = voting.claim_next(reviewers[0])
    assert first is not None and first.run_id == run.pk
    assignment = Assignment.objects.get(reviewer=reviewers[0])
    assert assignment.comparison_id == first.pk
    minutes = (assignment.expires_at - assignment.claimed_at).total_seconds() / 60
    assert minutes == pytest.approx(30, abs=0.1)
    assert voting.claim_next(reviewers[0]) == first  # reload-safe: no second claim
    assert Assignment.objects.filter(reviewer=reviewers[0]).count() == 1
    # K = 1: the others get other comparisons, and with three reviewers the run is fully claimed
    second, third = voting.claim_next(reviewers[1]), voting.claim_next(reviewers[2])
    assert len({first.pk, second.pk, third.pk}) == 3
    assert voting.claim_next(reviewers[0]) == first


def test_only_succeeded_runs_and_open_slots_are_offered(world: World, reviewers):
    v1 = world.version(1)
    world.run(v1, n=2, state=EvalRun.State.RUNNING)
    assert voting.claim_next(reviewers[0]) is None
    done = world.run(v1, n=1)
    put_votes([done.comparisons.get()], [reviewers[1]], ["candidate"])  # its only slot is voted
    assert voting.claim_next(reviewers[0]) is None
    fresh = world.run(v1, n=1)
    assert voting.claim_next(reviewers[0]).run_id == fresh.pk


def test_overlap_items_get_two_distinct_reviewers_and_come_first(world: World, make_user):
    run = world.run(world.version(1), n=4, wanted=[1, 1, 2, 1])
    people = [make_user(f"o{i}", "reviewer") for i in range(6)]
    got = [voting.claim_next(p) for p in people]
    overlap = run.comparisons.get(position=2)
    # the first claim takes position 0; the overlap item, once started, is finished before fresh items
    assert [c.position if c else None for c in got[:2]] == [0, 1]
    assert sum(1 for c in got if c and c.pk == overlap.pk) == 2
    holders = Assignment.objects.filter(comparison=overlap).values_list("reviewer", flat=True)
    assert len(set(holders)) == 2
    assert got[-1] is None  # 5 slots for 6 reviewers
    assert claims_of(run) == {c.pk: c.votes_wanted for c in run.comparisons.all()}


def test_partly_voted_overlap_items_are_claimed_before_fresh_ones(world: World, reviewers):
    run = world.run(world.version(1), n=3, wanted=[1, 1, 2])
    overlap = run.comparisons.get(position=2)
    put_votes([overlap], [reviewers[0]], ["tie"])
    assert voting.claim_next(reviewers[1]) == overlap
    assert voting.claim_next(reviewers[0]).position == 0  # it voted on the overlap item already


def test_an_expired_claim_frees_its_slot(world: World, reviewers):
    world.run(world.version(1), n=1)
    mine = voting.claim_next(reviewers[0])
    assert voting.claim_next(reviewers[1]) is None
    Assignment.objects.filter(reviewer=reviewers[0]).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert voting.claim_next(reviewers[1]) == mine
    # the first reviewer's late vote finds the slot taken and is refused in plain words
    with pytest.raises(voting.VoteRefused, match="ran out"):
        voting.cast_vote(reviewers[0], mine, "a")


def _in_threads(count, target):
    """Run target(i) in `count` threads started together; return results and errors by index."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, [None] * count

    def work(i):
        try:
            barrier.wait()
            results[i] = target(i)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results, errors


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_reviewers_never_share_a_slot_nor_lose_a_vote(world: World, make_user):
    """On PostgreSQL this exercises SELECT … FOR UPDATE SKIP LOCKED; on SQLite, serialised transactions."""
    wanted = [2 if i % 5 == 0 else 1 for i in range(60)]  # 72 slots
    run = world.run(world.version(1), n=60, wanted=wanted)
    people = [make_user(f"c{i}", "reviewer") for i in range(50)]

    def claim_and_vote(i):
        got = []
        for _ in range(2):
            comparison = voting.claim_next(people[i])
            if comparison is None:
                break
            voting.cast_vote(people[i], comparison, ("a", "b", "tie", "both_bad")[i % 4])
            got.append(comparison.pk)
        return got

    results, errors = _in_threads(50, claim_and_vote)
    assert errors == [None] * 50
    per_comparison = Counter(pk for got in results for pk in got)
    assert sum(per_comparison.values()) == 72  # every slot voted once: 100 attempts for 72 slots
    by_pk = {c.pk: c for c in run.comparisons.all()}
    for pk, n in per_comparison.items():
        assert n == by_pk[pk].votes_wanted
        assert by_pk[pk].votes_count == n == Vote.objects.filter(comparison_id=pk).count()
    for got in results:
        assert len(got) == len(set(got))  # nobody twice on one comparison
    overlap_voters = Vote.objects.filter(comparison__votes_wanted=2).values_list("comparison", "reviewer")
    assert all(n == 2 for n in Counter(c for c, _ in overlap_voters).values())
    assert Vote.objects.count() == 72
    assert AuditEvent.objects.filter(verb="eval.vote").count() == 72


@pytest.mark.django_db(transaction=True)
def test_a_double_submit_stores_one_vote(world: World, reviewers):
    world.run(world.version(1), n=1)
    comparison = voting.claim_next(reviewers[0])
    results, errors = _in_threads(4, lambda i: voting.cast_vote(reviewers[0], comparison, "a"))
    assert sum(1 for r in results if r is not None) == 1
    assert all(isinstance(e, voting.VoteRefused) and "already voted" in str(e) for e in errors if e)
    assert sum(1 for e in errors if e) == 3
    assert Vote.objects.count() == 1
    assert Comparison.objects.get(pk=comparison.pk).votes_count == 1


# =====================================================================================================
# Voting and skipping
# =====================================================================================================


def test_vote_resolves_sides_counts_and_audits_ids_only(world: World, reviewers):
    run = world.run(world.version(1), n=2, swapped=[False, True])
    straight, swapped = run.comparisons.order_by("position")
    voting.claim_next(reviewers[0])
    vote = voting.cast_vote(reviewers[0], straight, "a", comment="A invents an order number", seconds=12.5)
    assert (vote.choice, vote.outcome, vote.seconds) == ("a", "candidate", 12.5)
    voting.claim_next(reviewers[0])
    assert voting.cast_vote(reviewers[0], swapped, "a").outcome == "baseline"  # A shows the baseline here
    assert voting.resolve_outcome("b", True) == "candidate" and voting.resolve_outcome("tie", True) == "tie"
    assert Comparison.objects.get(pk=straight.pk).votes_count == 1
    event = AuditEvent.objects.filter(verb="eval.vote").order_by("id").first()
    assert event.data == {"vote": vote.pk, "run": run.pk} and event.object_id == str(straight.pk)
    assert "order number" not in str(event.data)
    with pytest.raises(voting.VoteRefused, match="Choose one of"):
        voting.cast_vote(reviewers[1], straight, "c")


def test_one_vote_per_reviewer_constraint_and_message(world: World, reviewers):
    run = world.run(world.version(1), n=1, wanted=[2])
    comparison = run.comparisons.get()
    voting.claim_next(reviewers[0])
    voting.cast_vote(reviewers[0], comparison, "b")
    with pytest.raises(voting.VoteRefused, match="already voted"):
        voting.cast_vote(reviewers[0], comparison, "a")
    with pytest.raises(IntegrityError), transaction.atomic():  # the database refuses it too
        Vote.objects.create(comparison=comparison, reviewer=reviewers[0], choice="a", outcome="candidate")
    assert Comparison.objects.get(pk=comparison.pk).votes_count == 1


def test_a_vote_without_a_claim_needs_a_free_slot(world: World, reviewers):
    run = world.run(world.version(1), n=1)
    comparison = run.comparisons.get()
    voting.claim_next(reviewers[0])
    with pytest.raises(voting.VoteRefused):
        voting.cast_vote(reviewers[1], comparison, "a")  # the only slot is reviewer 0's
    voting.cast_vote(reviewers[0], comparison, "tie")
    assert Vote.objects.get().reviewer == reviewers[0]


def test_skip_frees_the_slot_and_is_not_offered_again(world: World, reviewers):
    run = world.run(world.version(1), n=2)
    first = voting.claim_next(reviewers[0])
    voting.skip(reviewers[0], first)
    assert AuditEvent.objects.filter(verb="eval.vote.skip", object_id=str(first.pk)).count() == 1
    second = voting.claim_next(reviewers[0])
    assert second is not None and second != first
    assert voting.claim_next(reviewers[1]) == first  # the slot went back to the pool
    voting.cast_vote(reviewers[0], second, "a")
    assert voting.claim_next(reviewers[0]) is None  # never the skipped one again
    with pytest.raises(voting.VoteRefused, match="skipped"):
        voting.cast_vote(reviewers[0], first, "a")
    assert voting.progress(reviewers[0], run).done == 1


def test_trainers_do_not_vote_on_their_own_models(world: World, make_user, settings):
    trainer = make_user("trina", "engineer", "reviewer")
    job = TrainingJob.objects.create(
        dataset_version=world.dataset_version,
        base_model=world.base,
        method="lora",
        model_name="helpdesk-line",
        created_by=trainer,
    )
    mine = world.version(1, training_job=job)  # registered by the owner, trained by trina
    run = world.run(mine, n=1)
    assert voting.claim_next(trainer) is None
    with pytest.raises(voting.VoteRefused, match="trained"):
        voting.cast_vote(trainer, run.comparisons.get(), "a")
    # as the baseline of someone else's candidate too
    other = world.run(world.version(2), mine, n=1)
    assert voting.claim_next(trainer) is None
    assert voting.claim_next(make_user("neutral", "reviewer")).run_id == run.pk
    settings.STUDIO_VOTE_EXCLUDE_TRAINERS = False
    assert voting.claim_next(trainer).run_id == other.pk


# =====================================================================================================
# Pages
# =====================================================================================================


def test_review_flow_through_the_pages(world: World, reviewers, client_for):
    run = world.run(world.version(1), n=2)
    client = client_for(reviewers[0])
    queue = client.get(reverse("eval:reviews"))
    assert queue.status_code == 200 and f"Evaluation {run.pk}" in queue.content.decode()
    response = client.post(reverse("eval:review_next"), {"run": run.pk})
    comparison = Assignment.objects.get(reviewer=reviewers[0]).comparison
    assert response.status_code == 302 and response.url == reverse("eval:review", args=[comparison.pk])
    page = client.get(response.url).content.decode()
    assert "Comparison 1 of 2" in page
    response = client.post(response.url, {"choice": "b", "comment": "better tone", "shown_at": "0"})
    assert response.url == reverse("eval:review_done", args=[comparison.pk])
    vote = Vote.objects.get()
    assert (vote.choice, vote.comment) == ("b", "better tone")
    done = client.get(response.url).content.decode()
    assert "helpdesk-line/1" in done and "base model tiny-base-xq" in done  # revealed after the vote
    # a second submit of the same form: a message, no error page, still one vote
    again = client.post(reverse("eval:review", args=[comparison.pk]), {"choice": "a"}, follow=True)
    assert again.status_code == 200 and "already voted" in again.content.decode()
    assert Vote.objects.count() == 1
    nxt = client.post(reverse("eval:review_next"))
    assert nxt.url == reverse("eval:review", args=[run.comparisons.exclude(pk=comparison.pk).get().pk])
    skipped = client.post(reverse("eval:review_skip", args=[nxt.url.split("/")[-2]]), follow=True)
    assert "Nothing else is left" in skipped.content.decode()


def test_a_damaged_or_stale_run_in_the_review_form_is_refused_not_widened_to_every_run(
    world: World, reviewers, client_for
):
    run = world.run(world.version(1), n=2)
    client = client_for(reviewers[0])
    client.post(reverse("eval:review_next"), {"run": run.pk})  # the reviewer works on this run
    Assignment.objects.filter(reviewer=reviewers[0]).delete()
    missing = run.pk + 1000
    for garbled in ("abc", "9" * 5000, str(missing)):
        response = client.post(reverse("eval:review_next"), {"run": garbled}, follow=True)
        assert response.redirect_chain[-1][0] == reverse("eval:reviews")
        assert "That evaluation could not be found" in response.content.decode()
        assert not Assignment.objects.filter(reviewer=reviewers[0]).exists()  # nothing was claimed
        assert client.session["review_run"] == run.pk  # the run chosen before stays chosen
    # an empty value still means "any run"
    response = client.post(reverse("eval:review_next"), {"run": ""})
    assert "review_run" not in client.session and response.url.startswith("/")


def test_the_vote_page_is_blind_and_escaped(world: World, reviewers, client_for):
    candidate = world.version(7, pk=424242)
    baseline = world.version(3, pk=434343)
    run = world.run(
        candidate,
        baseline,
        n=1,
        outputs=[("<script>alert('x')</script> fine answer", "plain answer")],
        prompt=[{"role": "system", "content": "be kind"}, {"role": "user", "content": "<b>where</b> is it?"}],
        generation_pks=[919191, 929292],
    )
    comparison = voting.claim_next(reviewers[0])
    html = client_for(reviewers[0]).get(reverse("eval:review", args=[comparison.pk])).content.decode()
    assert "fine answer" in html and "plain answer" in html
    for secret in (
        "helpdesk-line",
        "424242",
        "434343",
        "919191",
        "929292",
        "tiny-base-xq",
        str(candidate),
        str(baseline),
        "candidate",
        "baseline",
        f"/runs/{run.pk}/",
    ):
        assert secret.lower() not in html.lower(), secret
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<b>where</b>" not in html and "&lt;b&gt;where&lt;/b&gt;" in html
    # keyboard shortcuts: four buttons with keys 1–4, the form hook and the script (served locally)
    for key, value in (("1", "a"), ("2", "b"), ("3", "tie"), ("4", "both_bad")):
        assert f'value="{value}"' in html and f'data-vote-key="{key}"' in html
    assert "data-vote-form" in html and "/static/studio/votes.js" in html


def test_a_comparison_of_someone_else_cannot_be_opened(world: World, reviewers, client_for):
    world.run(world.version(1), n=2)
    theirs = voting.claim_next(reviewers[0])
    client = client_for(reviewers[1])
    assert client.get(reverse("eval:review", args=[theirs.pk])).status_code == 404
    assert client.post(reverse("eval:review", args=[theirs.pk]), {"choice": "a"}).status_code == 404
    assert client.get(reverse("eval:review_done", args=[theirs.pk])).status_code == 404
    assert client.post(reverse("eval:review_skip", args=[theirs.pk])).status_code == 404
    assert Vote.objects.count() == 0


def test_role_matrix(world: World, make_user, client_for, curator, engineer, reviewer, admin_user):
    run = world.run(world.version(1), n=3)
    put_votes([run.comparisons.get(position=0)], [make_user("someone", "reviewer")], ["candidate"])
    review_pages = [("get", reverse("eval:reviews")), ("post", reverse("eval:review_next"))]
    stats_page = reverse("eval:run_stats", args=[run.pk])
    for user in (curator, engineer):
        client = client_for(user)
        for method, url in review_pages:
            assert getattr(client, method)(url).status_code == 403, (user, url)
    assert client_for(curator).get(stats_page).status_code == 403
    assert client_for(reviewer).get(stats_page).status_code == 403  # it names the models
    stats_html = client_for(engineer).get(stats_page)
    assert stats_html.status_code == 200 and "helpdesk-line/1" in stats_html.content.decode()
    for user in (reviewer, admin_user):
        client = client_for(user)
        assert client.get(reverse("eval:reviews")).status_code == 200
        opened = client.post(reverse("eval:review_next"))
        assert opened.status_code == 302 and client.get(opened.url).status_code == 200
    admin_stats = client_for(admin_user).get(stats_page).content.decode()
    assert "Win-rate" in admin_stats and "Leaderboard" in admin_stats
    anonymous = client_for(None).get(reverse("eval:reviews"))
    assert anonymous.status_code == 302 and "/login/" in anonymous.url
