"""Three gaps of the studio shell: proxy headers trusted only behind a declared reverse proxy, bounded
waits on PostgreSQL (connect timeout, TCP keepalives, the web server's statement timeout), and the audit
page's checkpoint kept in the database (signed), re-checked before the page continues from it."""

from __future__ import annotations

import time
from io import StringIO
from pathlib import Path
from unittest import mock

import pytest
import yaml
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import OperationalError, connection
from django.urls import reverse
from test_review8_followup import _counting_hash
from test_review8_studio import settings_of_a_fresh_process as _settings_in_subprocess

from studio import audit
from studio import settings as studio_settings
from studio.models import AuditCheckpoint, AuditEvent

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ONLY = pytest.mark.skipif(connection.vendor != "postgresql", reason="needs PostgreSQL")


# =====================================================================================================
# 1. X-Forwarded-Proto / X-Forwarded-For only behind a declared proxy
# =====================================================================================================


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (False, 0)),
        ({"STUDIO_BEHIND_PROXY": "", "STUDIO_TRUSTED_PROXY_COUNT": ""}, (False, 0)),  # compose's empties
        ({"STUDIO_BEHIND_PROXY": "false"}, (False, 0)),
        ({"STUDIO_BEHIND_PROXY": "true"}, (True, 1)),
        ({"STUDIO_BEHIND_PROXY": "true", "STUDIO_TRUSTED_PROXY_COUNT": "2"}, (True, 2)),
        ({"STUDIO_BEHIND_PROXY": "true", "STUDIO_TRUSTED_PROXY_COUNT": "0"}, (True, 0)),
        ({"STUDIO_TRUSTED_PROXY_COUNT": "1"}, (True, 1)),  # a proxy count declares the proxy
        ({"STUDIO_TRUSTED_PROXY_COUNT": "0"}, (False, 0)),
    ],
)
def test_proxy_settings_from_the_environment(env, expected):
    assert studio_settings.proxy_settings(env) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"STUDIO_BEHIND_PROXY": "false", "STUDIO_TRUSTED_PROXY_COUNT": "1"},  # contradiction
        {"STUDIO_TRUSTED_PROXY_COUNT": "-1"},
        {"STUDIO_BEHIND_PROXY": "maybe"},
    ],
)
def test_contradictory_or_invalid_proxy_settings_are_refused(env):
    with pytest.raises(ImproperlyConfigured):
        studio_settings.proxy_settings(env)


def test_production_trusts_x_forwarded_proto_only_behind_a_proxy(tmp_path):
    """STUDIO_PRODUCTION alone used to trust X-Forwarded-Proto while compose published gunicorn's port:
    any client reaching port 8000 could pass plain HTTP off as HTTPS."""
    keys = ("SECURE_PROXY_SSL_HEADER", "STUDIO_BEHIND_PROXY", "STUDIO_TRUSTED_PROXY_COUNT")
    direct = _settings_in_subprocess(tmp_path, *keys, STUDIO_PRODUCTION="true")
    assert direct == {
        "SECURE_PROXY_SSL_HEADER": None,
        "STUDIO_BEHIND_PROXY": False,
        "STUDIO_TRUSTED_PROXY_COUNT": 0,
    }
    behind = _settings_in_subprocess(tmp_path, *keys, STUDIO_PRODUCTION="true", STUDIO_BEHIND_PROXY="true")
    assert behind == {
        "SECURE_PROXY_SSL_HEADER": ["HTTP_X_FORWARDED_PROTO", "https"],
        "STUDIO_BEHIND_PROXY": True,
        "STUDIO_TRUSTED_PROXY_COUNT": 1,
    }


def test_a_forged_x_forwarded_proto_is_ignored_without_a_proxy(settings, client_for):
    settings.SECURE_HSTS_SECONDS = 3600
    settings.SECURE_PROXY_SSL_HEADER = None  # STUDIO_BEHIND_PROXY=false
    forged = client_for(None).get(reverse("login"), HTTP_X_FORWARDED_PROTO="https")
    assert forged.status_code == 200 and "Strict-Transport-Security" not in forged.headers
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")  # STUDIO_BEHIND_PROXY=true
    proxied = client_for(None).get(reverse("login"), HTTP_X_FORWARDED_PROTO="https")
    assert proxied.headers["Strict-Transport-Security"].startswith("max-age=3600")


def test_compose_publishes_web_on_loopback_and_passes_the_new_settings():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["web"]["ports"] == ["${STUDIO_WEB_BIND:-127.0.0.1}:8000:8000"]
    env = compose["x-studio-env"]
    # Empty unless the .env says otherwise: the settings then derive both (not behind a proxy).
    assert env["STUDIO_BEHIND_PROXY"] == "${STUDIO_BEHIND_PROXY:-}"
    assert env["STUDIO_TRUSTED_PROXY_COUNT"] == "${STUDIO_TRUSTED_PROXY_COUNT:-}"
    assert env["STUDIO_DB_STATEMENT_TIMEOUT_MS"] == "${STUDIO_DB_STATEMENT_TIMEOUT_MS:-30000}"
    readme = (ROOT / "README.md").read_text()
    for name in (
        "STUDIO_BEHIND_PROXY",
        "STUDIO_WEB_BIND",
        "STUDIO_DB_STATEMENT_TIMEOUT_MS",
        "STUDIO_DB_KEEPALIVES_IDLE",
        "STUDIO_DB_KEEPALIVES_INTERVAL",
        "STUDIO_DB_KEEPALIVES_COUNT",
        "DATABASE_CONNECT_TIMEOUT",
    ):
        assert f"`{name}`" in readme, name
        assert name in (ROOT / "docker-compose.yml").read_text(), name


# =====================================================================================================
# 2. Bounded waits on PostgreSQL
# =====================================================================================================


def test_postgres_options_bound_every_wait_and_time_out_web_statements_only():
    web = studio_settings.postgres_options({}, web=True)
    assert web == {
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "options": "-c statement_timeout=30000",
    }
    worker = studio_settings.postgres_options({}, web=False)
    assert "options" not in worker and worker["keepalives"] == 1 and worker["connect_timeout"] == 5

    env = {
        "DATABASE_CONNECT_TIMEOUT": "10",
        "STUDIO_DB_STATEMENT_TIMEOUT_MS": "1500",
        "STUDIO_DB_KEEPALIVES_IDLE": "20",
        "STUDIO_DB_KEEPALIVES_INTERVAL": "5",
        "STUDIO_DB_KEEPALIVES_COUNT": "4",
    }
    tuned = studio_settings.postgres_options(
        env, web=True, current={"sslmode": "require", "options": "-c x=1"}
    )
    assert tuned == {
        "sslmode": "require",  # from DATABASE_URL, kept
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 20,
        "keepalives_interval": 5,
        "keepalives_count": 4,
        "options": "-c x=1 -c statement_timeout=1500",
    }
    assert "options" not in studio_settings.postgres_options(
        {"STUDIO_DB_STATEMENT_TIMEOUT_MS": "0"}, web=True
    )
    for bad in (
        {"STUDIO_DB_STATEMENT_TIMEOUT_MS": "-1"},
        {"STUDIO_DB_KEEPALIVES_IDLE": "0"},
        {"DATABASE_CONNECT_TIMEOUT": "0"},
        {"STUDIO_DB_STATEMENT_TIMEOUT_MS": "soon"},
    ):
        with pytest.raises(ImproperlyConfigured):
            studio_settings.postgres_options(bad, web=True)


@pytest.mark.parametrize(
    ("argv", "modules", "web"),
    [
        (["manage.py", "runserver", "0:8000"], {}, True),
        (["/venv/bin/gunicorn", "studio.wsgi:application"], {"gunicorn": object()}, True),
        (["/venv/bin/celery", "-A", "studio", "worker"], {"celery": object()}, False),
        (["manage.py", "migrate"], {}, False),
        (["manage.py", "import_dataset", "x.jsonl"], {}, False),
    ],
)
def test_only_the_web_server_counts_as_web(argv, modules, web):
    assert studio_settings.is_web_server(argv, modules) is web


def test_settings_give_postgres_the_options_and_leave_sqlite_alone(tmp_path):
    url = "postgres://studio:secret@db.internal:5432/studio"
    worker = _settings_in_subprocess(tmp_path, "DATABASES", DATABASE_URL=url)["DATABASES"]["default"]
    assert worker["ENGINE"] == "django.db.backends.postgresql"
    assert worker["OPTIONS"] == {
        "connect_timeout": 5,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    # gunicorn imported before the application is loaded: the web server's statement timeout
    web = _settings_in_subprocess(
        tmp_path,
        "DATABASES",
        preamble="import gunicorn; ",
        DATABASE_URL=url,
        STUDIO_DB_STATEMENT_TIMEOUT_MS="9000",
    )["DATABASES"]["default"]
    assert web["OPTIONS"]["options"] == "-c statement_timeout=9000" and web["OPTIONS"]["keepalives"] == 1

    sqlite = _settings_in_subprocess(tmp_path, "DATABASES", preamble="import gunicorn; ")["DATABASES"][
        "default"
    ]
    assert sqlite["ENGINE"] == "django.db.backends.sqlite3"
    assert set(sqlite["OPTIONS"]) == {"timeout", "transaction_mode", "init_command"}


def _connection_with(options: dict):
    """A second connection to the test database, opened with these OPTIONS (as a process would)."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    settings_dict = {**connection.settings_dict, "OPTIONS": options}
    return DatabaseWrapper(settings_dict, alias="gap_test")


@POSTGRES_ONLY
@pytest.mark.django_db
def test_a_web_statement_running_past_the_timeout_is_cancelled():
    import psycopg

    web = _connection_with(
        studio_settings.postgres_options({"STUDIO_DB_STATEMENT_TIMEOUT_MS": "300"}, web=True)
    )
    worker = _connection_with(
        studio_settings.postgres_options({"STUDIO_DB_STATEMENT_TIMEOUT_MS": "300"}, web=False)
    )
    try:
        with web.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "300ms"
            started = time.monotonic()
            with pytest.raises(OperationalError) as cancelled:
                cur.execute("SELECT pg_sleep(3)")
            assert time.monotonic() - started < 2.5
        assert isinstance(cancelled.value.__cause__, psycopg.errors.QueryCanceled)
        assert "statement timeout" in str(cancelled.value)
        with web.cursor() as cur:  # the connection stays usable for the next request
            cur.execute("SELECT 1")
            assert cur.fetchone()[0] == 1
        with worker.cursor() as cur:  # a worker's connection has no limit
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "0"
            cur.execute("SELECT pg_sleep(0.5)")
    finally:
        web.close()
        worker.close()


@POSTGRES_ONLY
def test_a_statement_timeout_in_a_request_gives_the_503_page(admin_user, client_for, caplog):
    def slow_check(full=False):
        with connection.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = 200")  # as the web server's connections have it
            cur.execute("SELECT pg_sleep(3)")

    client = client_for(admin_user, raise_request_exception=False)
    with mock.patch("studio.views.verify_from_checkpoint", side_effect=slow_check):
        response = client.get(reverse("audit"))
    assert response.status_code == 503
    assert response["Retry-After"] == "60"
    body = response.content.decode()
    assert "Temporarily unavailable" in body and "Traceback" not in body and "pg_sleep" not in body
    assert "The database took too long to answer this page" in body and "can't reach" not in body
    assert "QueryCanceled" in caplog.text or "OperationalError" in caplog.text


# =====================================================================================================
# 3. The audit page's checkpoint: durable, signed, re-checked
# =====================================================================================================


def _verify_audit() -> tuple[int, str]:
    out, err = StringIO(), StringIO()
    try:
        call_command("verify_audit", stdout=out, stderr=err)
    except SystemExit as exited:
        return int(exited.code), err.getvalue()
    return 0, out.getvalue()


def _broken_at(page: str, event) -> bool:
    return (
        f'Chain broken at event <a href="{reverse("audit_event", args=[event.pk])}">#{event.pk}</a>' in page
    )


def test_clearing_the_cache_does_not_bring_back_a_walk_of_the_whole_chain(admin_user, client_for):
    for i in range(30):
        audit.record(admin_user, f"step.{i}", None, n=i)
    client = client_for(admin_user)
    assert "Chain intact, 30 events." in client.get(reverse("audit")).content.decode()
    checkpoint = AuditCheckpoint.objects.get()
    head = AuditEvent.objects.order_by("-id").first()
    assert (checkpoint.event_id, checkpoint.event_hash, checkpoint.checked) == (head.pk, head.hash, 30)

    cache.clear()
    newer = [audit.record(admin_user, "step.new", None, n=i) for i in range(2)]
    calls, counted = _counting_hash()
    with mock.patch.object(audit, "compute_hash", side_effect=counted):
        page = client.get(reverse("audit")).content.decode()
    assert sorted(calls) == [e.pk for e in newer]  # the new events only, nothing older
    assert "Chain intact, 32 events." in page and "Whole chain last checked" in page
    assert AuditCheckpoint.objects.get().event_id == newer[-1].pk

    # "Check the whole chain" still walks every event.
    calls, counted = _counting_hash()
    with mock.patch.object(audit, "compute_hash", side_effect=counted):
        full = client.post(reverse("audit"), {"verify": "full"}).content.decode()
    assert len(calls) == 32 and "Chain intact, 32 events." in full


def test_an_edit_before_the_checkpoint_is_caught_by_the_full_check_and_verify_audit(admin_user, client_for):
    events = [audit.record(admin_user, f"step.{i}", None, n=i) for i in range(5)]
    client = client_for(admin_user)
    client.get(reverse("audit"))  # checkpoint at the 5th event
    AuditEvent.objects.filter(pk=events[1].pk).update(data={"n": 99})

    # A page load reads only what is newer than the checkpoint (what the page says it does) …
    assert "Chain intact, 5 events." in client.get(reverse("audit")).content.decode()
    # … the whole check and the command catch the edit …
    status, err = _verify_audit()
    assert status == 1 and f"broken at event #{events[1].pk}" in err and "edited" in err
    full = client.post(reverse("audit"), {"verify": "full"}).content.decode()
    assert _broken_at(full, events[1]) and "Chain intact" not in full
    # … and from then on every page load walks the whole chain and keeps reporting it.
    for _ in range(2):
        assert _broken_at(client.get(reverse("audit")).content.decode(), events[1])
    assert AuditCheckpoint.objects.get().broken

    # Put right (the row restored from a backup): the page says so again, and checks incrementally.
    AuditEvent.objects.filter(pk=events[1].pk).update(data={"n": 1})
    assert "Chain intact, 5 events." in client.get(reverse("audit")).content.decode()
    assert not AuditCheckpoint.objects.get().broken
    assert _verify_audit()[0] == 0


def test_the_checkpointed_event_is_re_checked_before_the_page_continues_from_it(admin_user, client_for):
    """The walk continues from the hash the checkpoint recorded, after re-hashing that event: an edit to
    it alone (its hash column left as it was, so the next event still links to it) is reported."""
    events = [audit.record(admin_user, f"step.{i}", None, n=i) for i in range(3)]
    client = client_for(admin_user)
    client.get(reverse("audit"))
    audit.record(admin_user, "step.after", None)
    AuditEvent.objects.filter(pk=events[2].pk).update(data={"n": 7})
    page = client.get(reverse("audit")).content.decode()
    assert _broken_at(page, events[2]) and "does not match its hash" in page
    assert _verify_audit()[0] == 1


def test_a_chain_rewritten_through_the_checkpoint_is_reported(admin_user, client_for):
    """Someone with write access to the database edits an event and recomputes every hash after it: the
    chain links up again (verify_audit without --expect cannot tell), but the checkpointed event no
    longer has the hash the page verified, and the page says so on every load and on the full check."""
    events = [audit.record(admin_user, f"step.{i}", None, n=i) for i in range(4)]
    client = client_for(admin_user)
    client.get(reverse("audit"))  # checkpoint at events[3]
    prev = events[0].hash
    for event in AuditEvent.objects.filter(pk__gt=events[0].pk).order_by("id"):
        if event.pk == events[1].pk:
            event.data = {"n": 100}
        event.prev_hash = prev
        event.hash = audit.compute_hash(event)
        event.save(_allow_update=True)
        prev = event.hash
    assert _verify_audit()[0] == 0  # the chain itself links up

    page = client.get(reverse("audit")).content.decode()
    assert _broken_at(page, events[3]) and "not the one verified earlier" in page
    full = client.post(reverse("audit"), {"verify": "full"}).content.decode()
    assert _broken_at(full, events[3]) and "Chain intact" not in full
    assert AuditCheckpoint.objects.get().event_hash == events[3].hash  # kept: it stays reported


def test_deleting_the_checkpointed_event_is_reported(admin_user, client_for):
    events = [audit.record(admin_user, f"step.{i}", None) for i in range(4)]
    client = client_for(admin_user)
    client.get(reverse("audit"))
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    with connection.cursor() as cursor:  # the newest two: what is left still links up
        cursor.execute(f"DELETE FROM {table} WHERE id >= %s", [events[2].pk])  # noqa: S608 - constant table name
    page = client.get(reverse("audit")).content.decode()
    assert f"Chain broken: event #{events[3].pk}, verified earlier, is no longer in the log" in page
    assert "Chain intact" not in page
    full = client.post(reverse("audit"), {"verify": "full"}).content.decode()
    assert "no longer in the log" in full and "Chain intact" not in full
    # After investigating, removing the checkpoint (README, run-book) starts afresh.
    AuditCheckpoint.objects.all().delete()
    assert "Chain intact, 2 events." in client.get(reverse("audit")).content.decode()


def test_a_checkpoint_moved_in_the_database_is_not_trusted(admin_user, client_for, settings):
    """Moving the checkpoint past a tampered event would hide it from page loads: the row is signed with
    SECRET_KEY, so a moved (or otherwise rewritten) row is ignored and the whole chain walked."""
    for i in range(3):
        audit.record(admin_user, f"step.{i}", None, n=i)
    client = client_for(admin_user)
    client.get(reverse("audit"))  # checkpoint at the 3rd event
    later = [audit.record(admin_user, f"later.{i}", None, n=i) for i in range(3)]
    AuditEvent.objects.filter(pk=later[0].pk).update(data={"n": 42})
    AuditCheckpoint.objects.update(event_id=later[2].pk, event_hash=later[2].hash, checked=6)
    assert audit.load_checkpoint() is None
    page = client.get(reverse("audit")).content.decode()
    assert _broken_at(page, later[0]) and "the row was edited" in page

    # Under another SECRET_KEY the stored checkpoint is ignored too (the whole chain is walked once);
    # a key kept in SECRET_KEY_FALLBACKS still vouches for it.
    AuditEvent.objects.filter(pk=later[0].pk).update(data={"n": 0})
    assert "Chain intact, 6 events." in client.get(reverse("audit")).content.decode()
    old_key = settings.SECRET_KEY
    settings.SECRET_KEY = "another-" + old_key
    settings.SECRET_KEY_FALLBACKS = [old_key]
    assert audit.load_checkpoint() is not None
    settings.SECRET_KEY_FALLBACKS = []
    assert audit.load_checkpoint() is None
    calls, counted = _counting_hash()
    with mock.patch.object(audit, "compute_hash", side_effect=counted):  # signed in again: new key
        assert "Chain intact, 6 events." in client_for(admin_user).get(reverse("audit")).content.decode()
    assert len(calls) == 6
    assert audit.load_checkpoint() is not None  # signed again under the new key


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(connection.vendor != "sqlite", reason="the embedded mode's single write lock")
def test_a_page_load_while_an_import_holds_the_write_lock_does_not_wait_for_it(admin_user, client_for):
    """Embedded SQLite: a long import holds the database's one write lock. The audit page only moves
    its checkpoint to save later work, so it skips that write instead of waiting 30 s (and a 503)."""
    import sqlite3

    for i in range(5):
        audit.record(admin_user, f"step.{i}", None, n=i)
    client = client_for(admin_user)
    assert "Chain intact, 5 events." in client.get(reverse("audit")).content.decode()
    before = AuditCheckpoint.objects.get().event_id
    newer = audit.record(admin_user, "step.new", None, n=5)
    importer = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    importer.execute("BEGIN IMMEDIATE")  # as an import's transaction does
    try:
        started = time.monotonic()
        response = client.get(reverse("audit"))
        waited = time.monotonic() - started
    finally:
        importer.execute("ROLLBACK")
        importer.close()
    assert response.status_code == 200 and waited < 5
    assert "Chain intact, 6 events." in response.content.decode()
    assert AuditCheckpoint.objects.get().event_id == before  # not moved while the lock was held
    with connection.cursor() as cur:  # the connection's usual wait is back
        cur.execute("PRAGMA busy_timeout")
        assert cur.fetchone()[0] == 30000
    client.get(reverse("audit"))
    assert AuditCheckpoint.objects.get().event_id == newer.pk  # the next load moves it
