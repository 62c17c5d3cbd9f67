"""Review 8 follow-up: blind voting closed to a run's creator and to anyone who opened its labelled page,
an audit page that no longer walks the whole chain on every load, `setup_studio` never handing the
demo data to a deactivated admin, and the sign-in throttle on the file-based cache (atomic counting,
the window's expiry kept)."""

from __future__ import annotations

import threading
import time
from io import StringIO
from unittest import mock

import pytest
from django.core.cache.backends.filebased import FileBasedCache
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone
from test_eval_stats import World
from test_eval_stats import world as world  # noqa: F401 - the fixture

from eval_app.models import Assignment, EvalRun
from eval_app.services import voting
from studio import audit, ratelimit
from studio.models import AuditEvent

# =====================================================================================================
# 1. Blind voting: not the run's creator, not whoever opened the run's page
# =====================================================================================================


def test_the_engineer_who_created_a_run_is_not_given_its_comparisons(world: World, make_user):
    creator = make_user("cora", "engineer", "reviewer")
    run = world.run(world.version(1), n=2)
    EvalRun.objects.filter(pk=run.pk).update(created_by=creator)
    assert voting.claim_next(creator) is None
    assert voting.queue(creator) == []
    with pytest.raises(voting.VoteRefused, match="created this evaluation run"):
        voting.cast_vote(creator, run.comparisons.first(), "a")
    assert voting.claim_next(make_user("neutral", "reviewer")).run_id == run.pk


def test_opening_a_run_page_takes_the_viewer_out_of_its_blind_votes(
    world: World, admin_user, make_user, client_for, settings
):
    run = world.run(world.version(1), n=2)
    other = world.run(world.version(2), n=1)
    held = voting.claim_next(admin_user, run)  # an admin is a reviewer too: claimed one, then looks
    assert held is not None and held.run_id == run.pk
    client = client_for(admin_user)

    page = client.get(reverse("eval:run", args=[run.pk]))
    html = page.content.decode()
    assert page.status_code == 200 and "Answers side by side" in html
    assert 'id="unblinded-note"' in html and "no longer given this run" in html
    client.get(reverse("eval:run", args=[run.pk]))  # recorded once per person and run
    seen = AuditEvent.objects.filter(verb=voting.UNBLIND_VERB, actor=admin_user)
    assert list(seen.values_list("object_id", flat=True)) == [str(run.pk)]

    # the claim service, the vote service and the queue all leave the run out from now on
    assert voting.current_assignment(admin_user) is None
    assert voting.claim_next(admin_user, run) is None
    assert [row.run.pk for row in voting.queue(admin_user)] == [other.pk]
    with pytest.raises(voting.VoteRefused, match="opened this evaluation run"):
        voting.cast_vote(admin_user, held, "a")
    assert client.get(reverse("eval:review", args=[held.pk])).status_code == 404
    queue_html = client.get(reverse("eval:reviews")).content.decode()
    assert f"Evaluation {run.pk}" not in queue_html and f"Evaluation {other.pk}" in queue_html
    # the slot the viewer held was given back at once: someone else gets both comparisons
    assert Assignment.objects.get(reviewer=admin_user).expires_at <= timezone.now()
    fresh = make_user("fresh", "reviewer")
    got = {voting.claim_next(fresh, run).pk}
    voting.skip(fresh, run.comparisons.get(pk__in=got))
    got.add(voting.claim_next(fresh, run).pk)
    assert got == set(run.comparisons.values_list("pk", flat=True))
    # the runs they did not open stay open to them
    assert voting.claim_next(admin_user).run_id == other.pk
    # the same switch as the trainers' exclusion turns it off
    settings.STUDIO_VOTE_EXCLUDE_TRAINERS = False
    assert run.pk in voting.runs_open_to(admin_user)


def test_an_unfinished_run_page_does_not_count_as_opened(world: World, admin_user, client_for):
    run = world.run(world.version(1), n=2, state=EvalRun.State.RUNNING)
    assert client_for(admin_user).get(reverse("eval:run", args=[run.pk])).status_code == 200
    assert not AuditEvent.objects.filter(verb=voting.UNBLIND_VERB).exists()


# =====================================================================================================
# 2. The audit page checks only what is new; the whole chain on demand
# =====================================================================================================


def _counting_hash():
    calls, real = [], audit.compute_hash

    def counted(event):
        calls.append(event.pk)
        return real(event)

    return calls, counted


def test_loading_the_audit_page_does_not_walk_every_event(admin_user, client_for):
    for i in range(30):
        audit.record(admin_user, f"step.{i}", None, n=i)
    client = client_for(admin_user)
    assert "Chain intact, 30 events." in client.get(reverse("audit")).content.decode()
    newer = [audit.record(admin_user, "step.new", None, n=i) for i in range(2)]
    calls, counted = _counting_hash()
    with mock.patch.object(audit, "compute_hash", side_effect=counted):  # what the chain walk hashes
        page = client.get(reverse("audit")).content.decode()
        again = client.get(reverse("audit")).content.decode()
    assert sorted(calls) == [e.pk for e in newer]  # the two new events, once; nothing older
    assert "Chain intact, 32 events." in page and "Chain intact, 32 events." in again
    assert "Check the whole chain" in page and "Whole chain last checked" in page


def test_a_new_broken_link_is_still_reported_on_load(admin_user, client_for):
    for i in range(3):
        audit.record(admin_user, f"step.{i}", None)
    client = client_for(admin_user)
    client.get(reverse("audit"))
    edited = audit.record(admin_user, "step.late", None, n=1)
    AuditEvent.objects.filter(pk=edited.pk).update(data={"n": 2})
    page = client.get(reverse("audit")).content.decode()
    assert (
        f'Chain broken at event <a href="{reverse("audit_event", args=[edited.pk])}">#{edited.pk}</a>' in page
    )
    assert "3 events before it verified" in page


def test_the_on_demand_check_reports_a_broken_link(admin_user, client_for):
    events = [audit.record(admin_user, f"step.{i}", None) for i in range(4)]
    client = client_for(admin_user)
    client.get(reverse("audit"))  # remembers event 4 as verified
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {table} WHERE id = %s", [events[1].pk])  # noqa: S608 - constant name

    fragment = client.post(reverse("audit"), {"verify": "full"}, HTTP_HX_REQUEST="true")
    html = fragment.content.decode()
    assert fragment.status_code == 200 and "<html" not in html and 'id="chain-status"' in html
    assert f'Chain broken at event <a href="{reverse("audit_event", args=[events[2].pk])}">' in html
    assert "deleted or inserted" in html
    # without HTMX: the whole page with the report; and later loads keep reporting it
    full = client.post(reverse("audit"), {"verify": "full"}).content.decode()
    assert (
        "<html" in full
        and f'Chain broken at event <a href="{reverse("audit_event", args=[events[2].pk])}">' in full
    )
    later = client.get(reverse("audit")).content.decode()
    assert "Chain broken at event" in later and "Chain intact" not in later
    # verify_audit still walks everything
    err = StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("verify_audit", stdout=StringIO(), stderr=err)
    assert exited.value.code == 1 and f"broken at event #{events[2].pk}" in err.getvalue()


def test_the_on_demand_check_is_for_admins_only(admin_user, engineer, client_for):
    audit.record(admin_user, "x.y", None)
    assert client_for(engineer).post(reverse("audit"), {"verify": "full"}).status_code == 403
    assert "Chain intact, 1 event." in client_for(admin_user).post(reverse("audit")).content.decode()


# =====================================================================================================
# 3. setup_studio: an active admin owns the demo data
# =====================================================================================================


def test_setup_studio_never_picks_a_deactivated_admin(make_user, monkeypatch):
    monkeypatch.delenv("STUDIO_ADMIN_PASSWORD", raising=False)
    make_user("gone", "admin", is_active=False)  # the oldest admin, deactivated
    make_user("root", is_superuser=True, is_active=False)
    active = make_user("ada", "admin")
    owners = []
    monkeypatch.setattr(
        "studio.management.commands.setup_studio.Command._demo", lambda self, admin: owners.append(admin)
    )
    call_command("setup_studio", "--skip-model", stdout=StringIO(), stderr=StringIO())
    assert owners == [active]


def test_setup_studio_creates_an_admin_when_every_admin_is_deactivated(
    make_user, monkeypatch, django_user_model
):
    monkeypatch.delenv("STUDIO_ADMIN_PASSWORD", raising=False)
    make_user("gone", "admin", is_active=False)
    owners = []
    monkeypatch.setattr(
        "studio.management.commands.setup_studio.Command._demo", lambda self, admin: owners.append(admin)
    )
    out = StringIO()
    call_command("setup_studio", "--skip-model", stdout=out, stderr=StringIO())
    created = django_user_model.objects.get(username="admin")
    assert owners == [created] and created.is_active and "Created the first admin 'admin'" in out.getvalue()


def test_setup_studio_explains_a_deactivated_admin_called_admin(make_user):
    make_user("admin", "admin", is_active=False)
    with pytest.raises(CommandError, match="'admin' is deactivated"):
        call_command("setup_studio", "--skip-model", "--skip-demo", stdout=StringIO(), stderr=StringIO())


# =====================================================================================================
# 4. Sign-in throttle on the file-based cache
# =====================================================================================================


@pytest.fixture
def file_cache(settings, tmp_path):
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(tmp_path / "cache"),  # no TIMEOUT: the default 300 s, as in the embedded mode
        }
    }
    settings.STUDIO_LOGIN_MAX_ATTEMPTS = 3
    settings.STUDIO_LOGIN_WINDOW_SECONDS = 900
    return settings


def test_file_cache_counts_keep_the_window_not_the_default_timeout(file_cache, monkeypatch):
    request = RequestFactory().post("/login/", REMOTE_ADDR="10.9.9.9")
    for _ in range(3):
        assert ratelimit.reserve(request, "bob") is None  # the third attempt reaches the limit
    key = ratelimit.username_key("bob")
    assert ratelimit.failures(key)[0] == 3
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 400)  # past the cache's default 300 s
    count, until = ratelimit.failures(key)
    assert count == 3 and until is not None
    lockout = ratelimit.check(request, "bob")
    assert lockout is not None and 400 < lockout.retry_after <= 500
    # giving an attempt back keeps the window's expiry too
    ratelimit.succeeded(request, "bob")
    monkeypatch.setattr(time, "time", lambda: real() + 750)
    assert ratelimit.failures(ratelimit.ip_key(request))[0] == 2


def test_file_cache_counts_parallel_attempts_one_by_one(file_cache):
    real_get = FileBasedCache.get

    def slow_get(self, *args, **kwargs):  # widen the read-modify-write window, as a loaded disk would
        value = real_get(self, *args, **kwargs)
        time.sleep(0.03)
        return value

    key = ratelimit.username_key("carol")
    barrier = threading.Barrier(5)
    numbers, errors = [], []

    def attempt():
        try:
            barrier.wait()
            numbers.append(ratelimit._register(key))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with mock.patch.object(FileBasedCache, "get", slow_get):
        threads = [threading.Thread(target=attempt) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    assert sorted(numbers) == [1, 2, 3, 4, 5]
    assert ratelimit.failures(key)[0] == 5
