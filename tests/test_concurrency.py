"""Concurrency (issue 5 §2): 50 reviewers voting and 5 engineers launching training jobs at the same
moment, over real HTTP, while two real `celery worker -Q gpu` processes consume the jobs.

Expected: no vote lost or duplicated, no comparison voted beyond what it wants, no 5xx answer, and every
job executed exactly once (one start, one attempt, one curve, one set of artifacts, one model version).

The server is pytest-django's `live_server`: Django's ThreadedWSGIServer on a real socket, one thread per
client connection, each thread with its own database connection and transactions, so the claims and votes
of the 50 reviewers really race in the database (SELECT … FOR UPDATE SKIP LOCKED and row locks on
PostgreSQL, BEGIN IMMEDIATE on SQLite) exactly as they do under gunicorn's threads and processes. It is
chosen over a gunicorn subprocess (bench/votes_load.py) because it runs with the test's own settings:
the fast test password hasher (55 sign-ins at production PBKDF2 strength would cost about a minute of
CPU on a small CI machine, and the settings expose no hasher switch to a subprocess), the per-test data
directory and broker folder that `start_worker` shares with the Celery workers, and the per-test cache.

Every client is a `requests.Session` that signs in through the login form with its CSRF token; all 55
clients then wait on one `threading.Barrier` and start together. Reviewers do what the pages offer:
claim the next comparison (POST), open it, post the vote from the page's own form (CSRF token, shown_at),
open the reveal page — until the studio says nothing is left or they have cast VOTES_EACH votes. There are
fewer slots than the reviewers could fill, so the last slots are fought over. Engineers open the new-job
form with the smoke preset, fill it from the page (the tiny base model, the frozen dataset version) and
post it.

Runs on PostgreSQL + Redis in CI (`.ci/run`) and on the local SQLite + filesystem-broker default.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from conftest import TEST_PASSWORD, make_version, wait_for
from django.db.models import Count, F
from django.urls import reverse
from test_eval_stats import World
from test_eval_stats import world as world  # noqa: F401 - the fixture

from eval_app.models import Comparison, ModelVersion, Vote
from studio.audit import verify_chain
from studio.models import AuditEvent
from training_app.models import ComputeNode, TrainingJob, TrainingMetric
from training_app.services import register_local_dir

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

REVIEWERS = 50
ENGINEERS = 5
VOTES_EACH = 3  # at most, per reviewer: 150 wanted against SLOTS
COMPARISONS = 64
WANTED = [2 if i % 4 == 0 else 1 for i in range(COMPARISONS)]  # 16 overlap items: 80 slots
SLOTS = sum(WANTED)
TIMEOUT = 120  # seconds, per HTTP request: generous for a loaded 2-core machine

TOKEN = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
SHOWN_AT = re.compile(r'name="shown_at" value="([^"]+)"')
REVIEW_URL = re.compile(r"/models/reviews/(\d+)/$")
JOB_URL = re.compile(r"/training/jobs/(\d+)/$")


class FormFields(HTMLParser):
    """The values a browser would submit from the form with id `form_id`: text/number/hidden inputs,
    checked checkboxes, each select's selected option (and every option's label, to choose by name)."""

    def __init__(self, form_id: str):
        super().__init__()
        self.form_id, self.inside = form_id, False
        self.values: dict[str, str] = {}
        self.options: dict[str, dict[str, str]] = {}  # select name -> {label: value}
        self._select = self._option = None

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        if not self.inside:
            return
        if tag == "input" and a.get("name"):
            kind = a.get("type", "text")
            if kind == "checkbox":
                if "checked" in a:
                    self.values[a["name"]] = a.get("value") or "on"
            elif kind not in ("submit", "button"):
                self.values[a["name"]] = a.get("value", "")
        elif tag == "select":
            self._select = a.get("name")
            self.options.setdefault(self._select, {})
            self.values.pop(self._select, None)
        elif tag == "option" and self._select:
            self._option = a.get("value", "")
            if "selected" in a or self._select not in self.values:  # unselected: the first option
                self.values[self._select] = self._option
        elif tag == "textarea" and a.get("name"):
            self.values[a["name"]] = ""

    def handle_data(self, data):
        if self.inside and self._select and self._option is not None and data.strip():
            self.options[self._select][data.strip()] = self._option

    def handle_endtag(self, tag):
        if tag == "option":
            self._option = None
        elif tag == "select":
            self._select = None
        elif tag == "form":
            self.inside = False


class Client(threading.Thread):
    """One person in a browser: signs in through the form, waits at the barrier, then works."""

    def __init__(self, base: str, username: str, barrier: threading.Barrier):
        super().__init__(daemon=True, name=f"client-{username}")
        self.base, self.username, self.barrier = base, username, barrier
        self.session = requests.Session()
        self.statuses: list[tuple[str, str, int]] = []  # (method, path, status) of every answer
        self.problems: list[str] = []

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        response = self.session.request(
            method, f"{self.base}{path}", allow_redirects=False, timeout=TIMEOUT, **kwargs
        )
        self.statuses.append((method, path, response.status_code))
        return response

    def sign_in(self) -> bool:
        page = self.request("GET", "/login/")
        token = TOKEN.search(page.text)
        if page.status_code != 200 or token is None:
            self.problems.append(f"login page answered {page.status_code} without a CSRF token")
            return False
        signed_in = self.request(
            "POST",
            "/login/",
            data={"username": self.username, "password": TEST_PASSWORD, "csrfmiddlewaretoken": token[1]},
        )
        if signed_in.status_code != 302:
            self.problems.append(f"sign-in answered {signed_in.status_code}")
            return False
        return True

    def run(self) -> None:
        try:
            ready = self.sign_in()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.problems.append(f"sign-in raised {type(exc).__name__}: {exc}"[:300])
            ready = False
        try:
            self.barrier.wait(timeout=300)
        except threading.BrokenBarrierError:
            self.problems.append("the barrier broke: not every client signed in")
            return
        if not ready:
            return
        try:
            self.work()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.problems.append(f"{type(exc).__name__}: {exc}"[:300])

    def work(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        # closing the sockets ends the server's connection threads, which close their database connections
        self.session.close()


class Reviewer(Client):
    def __init__(self, base, username, barrier, seed: int):
        super().__init__(base, username, barrier)
        self.seed = seed
        self.accepted: list[int] = []  # comparison ids whose vote the studio confirmed (redirect to done)
        self.refused: list[str] = []
        self.nothing_left = False

    def work(self) -> None:
        choices = ("a", "b", "tie", "both_bad")
        for n in range(VOTES_EACH):
            csrf = self.session.cookies.get("csrftoken", "")
            claim = self.request("POST", reverse("eval:review_next"), headers={"X-CSRFToken": csrf})
            location = claim.headers.get("Location", "")
            if claim.status_code == 302 and location.endswith(reverse("eval:reviews")):
                self.nothing_left = True
                return
            match = REVIEW_URL.search(location)
            if claim.status_code != 302 or match is None:
                self.problems.append(f"claim answered {claim.status_code} -> {location or '-'}")
                return
            pk = int(match[1])
            page = self.request("GET", reverse("eval:review", args=[pk]))
            if page.status_code != 200 or "data-vote-form" not in page.text:
                self.problems.append(f"comparison {pk}: the vote page answered {page.status_code}")
                return
            data = {
                "csrfmiddlewaretoken": TOKEN.search(page.text)[1],
                "shown_at": SHOWN_AT.search(page.text)[1],
                "choice": choices[(self.seed + n) % 4],
                "comment": "",
            }
            voted = self.request("POST", reverse("eval:review", args=[pk]), data=data)
            if voted.status_code == 302 and voted.headers.get("Location", "").endswith(
                reverse("eval:review_done", args=[pk])
            ):
                self.accepted.append(pk)
            else:
                self.refused.append(f"comparison {pk}: the vote answered {voted.status_code}")
                return
            done = self.request("GET", reverse("eval:review_done", args=[pk]))
            if done.status_code != 200:
                self.problems.append(f"comparison {pk}: the reveal page answered {done.status_code}")


class Engineer(Client):
    def __init__(self, base, username, barrier, dataset_version: int, base_model_name: str):
        super().__init__(base, username, barrier)
        self.dataset_version, self.base_model_name = dataset_version, base_model_name
        self.job_id: int | None = None

    def work(self) -> None:
        path = reverse("training:job_new")
        page = self.request("GET", f"{path}?preset=smoke&dataset_version={self.dataset_version}")
        if page.status_code != 200:
            self.problems.append(f"the new-job form answered {page.status_code}")
            return
        form = FormFields("job-form")
        form.feed(page.text)
        data = dict(form.values)
        base_choice = form.options.get("base_model", {}).get(self.base_model_name)
        if base_choice is None or data.get("dataset_version") != str(self.dataset_version):
            self.problems.append(f"the form offers no {self.base_model_name} or lost the dataset version")
            return
        data["base_model"] = base_choice
        launched = self.request("POST", path, data=data)
        match = JOB_URL.search(launched.headers.get("Location", ""))
        if launched.status_code != 302 or match is None:
            errors = re.findall(
                r'class="(?:field-error|alert alert-error)"[^>]*>(.*?)</div>', launched.text, re.S
            )
            self.problems.append(f"launch answered {launched.status_code}: {errors[:3]}")
            return
        self.job_id = int(match[1])
        detail = self.request("GET", reverse("training:job", args=[self.job_id]))
        if detail.status_code != 200:
            self.problems.append(f"job {self.job_id} page answered {detail.status_code}")


def test_fifty_reviewers_and_five_engineers_at_once(
    live_server, world: World, make_user, curator, admin_user, tiny_model_dir, start_worker
):
    # two workers first: they take a few seconds to start, and then consume the jobs while votes go on
    workers = [start_worker("gpu"), start_worker("gpu")]

    base_model = register_local_dir("tiny-llama", Path(tiny_model_dir), admin_user)
    dataset_version = make_version(curator, train=8, eval_=2)
    run = world.run(world.version(1), n=COMPARISONS, wanted=WANTED)
    reviewers = [make_user(f"reviewer{i:02d}", "reviewer") for i in range(REVIEWERS)]
    engineers = [make_user(f"engineer{i}", "engineer") for i in range(ENGINEERS)]

    barrier = threading.Barrier(REVIEWERS + ENGINEERS + 1)
    base = live_server.url
    voters = [Reviewer(base, u.username, barrier, seed=i) for i, u in enumerate(reviewers)]
    launchers = [Engineer(base, u.username, barrier, dataset_version.pk, base_model.name) for u in engineers]
    clients: list[Client] = [*voters, *launchers]
    try:
        for c in clients:
            c.start()
        # both workers consuming (each reports its devices once its consumer is up) before the load starts
        for worker in workers:
            wait_for(lambda: ComputeNode.objects.count() == 2, worker, timeout=240, what="two ready workers")
        barrier.wait(timeout=300)  # everybody signed in: the load starts now
        started = time.monotonic()
        for c in clients:
            c.join(timeout=600)
        load_seconds = time.monotonic() - started
    except BaseException:
        barrier.abort()  # clients still waiting give up at once instead of at the barrier's timeout
        raise
    finally:
        for c in clients:
            c.close()
    assert not [c.username for c in clients if c.is_alive()], "clients still running after 10 minutes"

    # --- HTTP: no 5xx, nothing unexpected -----------------------------------------------------------
    answers = [s for c in clients for s in c.statuses]
    server_errors = [s for s in answers if s[2] >= 500]
    assert not server_errors, f"{len(server_errors)} answers with 5xx, e.g. {server_errors[:5]}"
    problems = {c.username: c.problems for c in clients if c.problems}
    assert not problems, f"clients saw unexpected answers: {problems}"
    refused = [r for v in voters for r in v.refused]
    assert not refused, f"votes refused although their reviewer held the claim: {refused[:5]}"

    # --- votes: none lost, none duplicated, none beyond votes_wanted ------------------------------------
    accepted = Counter((pk, v.username) for v in voters for pk in v.accepted)
    repeated = {key: n for key, n in accepted.items() if n > 1}
    assert not repeated, f"the studio confirmed a second vote by one reviewer on one comparison: {repeated}"
    votes = Vote.objects.filter(comparison__run=run)
    stored = Counter(votes.values_list("comparison_id", "reviewer__username"))
    duplicated = {key: n for key, n in stored.items() if n > 1}
    assert not duplicated, f"votes stored twice for (comparison, reviewer): {duplicated}"
    lost = set(accepted) - set(stored)
    assert not lost, f"{len(lost)} votes confirmed to the client but not stored, e.g. {sorted(lost)[:5]}"
    unconfirmed = set(stored) - set(accepted)
    assert not unconfirmed, f"{len(unconfirmed)} votes stored that no client saw accepted: {unconfirmed}"
    assert sum(accepted.values()) == votes.count() == len(stored)
    per_comparison = Comparison.objects.filter(run=run).annotate(n=Count("votes"))
    over = list(per_comparison.filter(n__gt=F("votes_wanted")).values_list("pk", "n", "votes_wanted"))
    assert not over, f"comparisons voted beyond votes_wanted (pk, votes, wanted): {over}"
    out_of_step = list(per_comparison.exclude(n=F("votes_count")).values_list("pk", "n", "votes_count"))
    assert not out_of_step, f"votes_count differs from the stored votes (pk, votes, count): {out_of_step}"
    # 150 votes wanted by the reviewers for 80 slots: every slot is filled, and only then do they hear
    # that nothing is left
    assert votes.count() == SLOTS, f"{votes.count()} votes stored for {SLOTS} slots"
    assert all(v.nothing_left or len(v.accepted) == VOTES_EACH for v in voters)
    assert AuditEvent.objects.filter(verb="eval.vote").count() == SLOTS

    # --- jobs: one per engineer, each executed exactly once -------------------------------------------
    job_ids = [e.job_id for e in launchers]
    assert None not in job_ids and len(set(job_ids)) == ENGINEERS, f"jobs launched: {job_ids}"
    for e in launchers:
        mine = list(TrainingJob.objects.filter(created_by__username=e.username).values_list("pk", flat=True))
        assert mine == [e.job_id], f"{e.username} launched one job, the studio holds {mine}"
    assert TrainingJob.objects.count() == ENGINEERS

    final = ("succeeded", "failed", "cancelled")
    wait_for(
        lambda: TrainingJob.objects.filter(state__in=final).count() == ENGINEERS,
        workers[0],
        timeout=420,
        what="the five jobs to finish",
    )
    for worker in workers:
        assert worker["proc"].poll() is None, f"a worker died: {worker['log'].read_text()[-3000:]}"
    artifact_dirs = set()
    for job in TrainingJob.objects.order_by("pk"):
        assert job.state == "succeeded", (
            job.pk,
            job.error_code,
            job.error_message,
            job.error_traceback[-2000:],
        )
        assert job.attempt == 1, f"job {job.pk} ran {job.attempt} attempts"
        verbs = list(
            AuditEvent.objects.filter(object_id=str(job.pk), verb__startswith="training.job")
            .order_by("id")
            .values_list("verb", flat=True)
        )
        assert verbs == ["training.job.create", "training.job.start", "training.job.succeed"], (job.pk, verbs)
        rows = list(TrainingMetric.objects.filter(job=job).values_list("step", "name", "attempt"))
        twice = {key: n for key, n in Counter((s, n) for s, n, _ in rows).items() if n > 1}
        assert not twice, f"job {job.pk}: metric rows written twice (step, name): {twice}"
        loss_steps = sorted(s for s, n, _ in rows if n == "loss")
        assert loss_steps == list(range(1, job.total_steps + 1)) and job.step == job.total_steps == 5, (
            job.pk,
            loss_steps,
            job.step,
        )
        assert {a for _, _, a in rows} == {1}
        # one set of artifacts: the published final folder, nothing left of a second publish
        final_dir = Path(job.artifacts_dir)
        assert final_dir == job.output_dir / "final" and final_dir.is_dir(), (job.pk, job.artifacts_dir)
        assert (final_dir / "adapter_model.safetensors").is_file() and (final_dir / "model_card.md").is_file()
        leftovers = [p.name for p in job.output_dir.iterdir() if p.name.startswith(("final.", ".tmp-final"))]
        assert not leftovers, f"job {job.pk}: more than one set of artifacts: {leftovers}"
        artifact_dirs.add(final_dir)
        versions = list(ModelVersion.objects.filter(training_job=job).values_list("pk", flat=True))
        assert len(versions) == 1, f"job {job.pk} registered {len(versions)} model versions"
    assert len(artifact_dirs) == ENGINEERS
    # the five jobs land in one model line concurrently: versions 1..5, none numbered twice
    line = ModelVersion.objects.get(training_job_id=job_ids[0]).registered_model
    numbers = sorted(line.versions.filter(training_job__isnull=False).values_list("number", flat=True))
    assert numbers == [1, 2, 3, 4, 5]

    chain = verify_chain()
    assert chain.ok, f"the audit chain broke at event {chain.broken_at} under concurrent writers"
    print(
        f"\nconcurrency: {len(answers)} HTTP answers in {load_seconds:.1f} s of load, {votes.count()} votes "
        f"for {SLOTS} slots, {ENGINEERS} jobs succeeded once each, audit chain of {chain.checked} events intact"
    )
