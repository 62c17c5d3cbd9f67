"""Review 8 of the studio shell: sign-in throttle races, the login redirect loop, production settings
read from the environment, security headers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from conftest import TEST_PASSWORD
from django.contrib.auth.backends import ModelBackend
from django.test import Client
from django.urls import reverse

ROOT = Path(__file__).resolve().parent.parent


def login(client, username, password, ip="10.0.0.1", **extra):
    return client.post(
        reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip, **extra
    )


@pytest.fixture
def throttle(settings):
    settings.STUDIO_LOGIN_MAX_ATTEMPTS = 3
    settings.STUDIO_LOGIN_WINDOW_SECONDS = 300
    return settings


# --- sign-in throttle -------------------------------------------------------------------------------------


def test_parallel_sign_in_attempts_cannot_go_past_the_limit(
    throttle, curator, make_user, client_for, user_password
):
    """Attempts that arrive together (a burst of parallel requests) used to all pass the lock check
    before any of them counted its failure, so a burst got as many password guesses as it had
    requests. Here each guess, while its password is being checked, fires the next one."""
    for _ in range(2):
        assert login(client_for(None), "carla", "wrong-password").status_code == 200

    real = ModelBackend.authenticate
    calls = []
    answers = []
    fired = []

    def authenticate(self, request, username=None, password=None, **kwargs):
        calls.append(password)
        if len(fired) < 5:  # while this guess is in flight, the next one arrives
            fired.append(len(fired))
            answers.append(login(Client(), "carla", f"guess-{len(fired)}", ip=f"10.1.0.{len(fired)}"))
        return real(self, request, username=username, password=password, **kwargs)

    with mock.patch.object(ModelBackend, "authenticate", autospec=True, side_effect=authenticate):
        first = login(client_for(None), "carla", "guess-first", ip="10.2.0.1")
    # Only one more password (the third of three) was checked; every parallel one was refused.
    assert len(calls) == 1, calls
    assert first.status_code == 429
    assert answers and all(answer.status_code == 429 for answer in answers)

    # Counting before the password check must not make good sign-ins use up an office's address.
    throttle.STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP = 2
    for n in range(4):
        make_user(f"staff{n}", "curator")
        assert login(client_for(None), f"staff{n}", user_password, ip="192.0.2.9").status_code == 302
    assert login(client_for(None), "staff0", "typo", ip="192.0.2.9").status_code == 200
    assert login(client_for(None), "staff1", "typo", ip="192.0.2.9").status_code == 429


# --- login redirect loop ----------------------------------------------------------------------------------


def test_signed_in_user_sent_to_the_login_page_with_next_login_gets_the_dashboard(curator, client_for):
    """Django's LoginView raises "Redirection loop" (a 500) when a signed-in user opens
    /login/?next=/login/ (a stale bookmark, or the page reached again after signing in)."""
    client = client_for(curator, raise_request_exception=False)
    response = client.get(reverse("login"), {"next": "/login/"})
    assert response.status_code == 302
    assert response["Location"] == reverse("home")


def test_sign_in_with_next_pointing_at_the_login_page_lands_on_the_dashboard(
    curator, client_for, user_password
):
    """Signing in from /login/?next=/login/%3Fnext%3D/login/ used to send the person to the login
    page with next=/login/, which then answered 500."""
    client = client_for(None, raise_request_exception=False)
    response = client.post(
        reverse("login"),
        {"username": "carla", "password": user_password, "next": "/login/?next=/login/"},
        follow=True,
    )
    assert response.status_code == 200
    assert response.redirect_chain == [(reverse("home"), 302)]
    # an address on another site is still ignored
    response = login(client_for(None), "carla", user_password, next="//evil.example/")
    assert response["Location"] == reverse("home")


# --- production settings from the environment -----------------------------------------------------------


def settings_of_a_fresh_process(tmp_path, *keys: str, preamble: str = "", **env) -> dict:
    """Selected settings of a fresh process started with `env` (and `preamble` run before Django loads)."""
    code = (
        f"{preamble}import json, django; django.setup(); from django.conf import settings as s; "
        f"print(json.dumps({{k: getattr(s, k, None) for k in {keys!r}}}, default=str))"
    )
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("STUDIO_", "DATABASE_", "CELERY_"))}
    full_env.update(
        DJANGO_SETTINGS_MODULE="studio.settings",
        SECRET_KEY="x" * 60,
        STUDIO_ENCRYPTION_KEY="Zm9yLWJ1aWxkLW9ubHktbm90LWEtcmVhbC1rZXktMDA9",
        STUDIO_VAR_DIR=str(tmp_path / "var"),
        **env,
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _settings_in_subprocess(tmp_path, **env) -> dict:
    keys = (
        "STUDIO_TRUSTED_PROXY_COUNT",
        "STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP",
        "SECURE_PROXY_SSL_HEADER",
        "SESSION_COOKIE_SECURE",
        "STUDIO_CSP",
        "ALLOWED_HOSTS",
        "SESSION_COOKIE_AGE",
    )
    return settings_of_a_fresh_process(tmp_path, *keys, **env)


def test_sign_in_throttle_settings_are_read_from_the_environment(tmp_path):
    """STUDIO_TRUSTED_PROXY_COUNT (behind the TLS proxy every client otherwise shares the proxy's
    address, so 20 typos anywhere lock the whole bank out) and STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP were
    only looked up on the settings module, never read from the environment."""
    values = _settings_in_subprocess(
        tmp_path, STUDIO_TRUSTED_PROXY_COUNT="1", STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP="50"
    )
    assert values["STUDIO_TRUSTED_PROXY_COUNT"] == 1
    assert values["STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP"] == 50
    defaults = _settings_in_subprocess(tmp_path, STUDIO_LOGIN_MAX_ATTEMPTS="4")
    assert defaults["STUDIO_TRUSTED_PROXY_COUNT"] == 0
    assert defaults["STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP"] == 16
    assert "frame-ancestors 'none'" in defaults["STUDIO_CSP"]
    assert (
        _settings_in_subprocess(tmp_path, STUDIO_CSP="default-src 'self'")["STUDIO_CSP"]
        == "default-src 'self'"
    )


# --- security headers -------------------------------------------------------------------------------------


def test_pages_send_a_content_security_policy(curator, client_for):
    for response in (client_for(None).get(reverse("login")), client_for(curator).get(reverse("home"))):
        policy = response.headers.get("Content-Security-Policy", "")
        directives = {part.split()[0]: part.split()[1:] for part in policy.split(";") if part.strip()}
        assert directives.get("frame-ancestors") == ["'none'"], policy
        assert directives.get("object-src") == ["'none'"], policy
        assert directives.get("base-uri") == ["'self'"], policy
        assert directives.get("script-src") == ["'self'"], policy  # no inline script runs
        assert "'self'" in directives.get("default-src", []), policy
        assert response.headers.get("Cross-Origin-Opener-Policy") == "same-origin"
        assert response.headers.get("X-Frame-Options") == "DENY"


def test_content_security_policy_can_be_replaced_or_turned_off(settings, client_for):
    settings.STUDIO_CSP = "default-src 'none'"
    assert client_for(None).get(reverse("login")).headers["Content-Security-Policy"] == "default-src 'none'"
    settings.STUDIO_CSP = ""
    assert "Content-Security-Policy" not in client_for(None).get(reverse("login")).headers


# --- heartbeat ----------------------------------------------------------------------------------------


def test_heartbeat_keeps_beating_after_a_database_blip(settings):
    """One failed UPDATE (a dropped connection, a lock timeout) used to end the heartbeat thread for
    good: the work went on while its heartbeat went silent, so the watchdog requeued live work."""
    import threading
    import time

    from django.db import OperationalError

    from studio.heartbeat import Heartbeat

    settings.STUDIO_JOB_HEARTBEAT_SECONDS = 0.01
    beats = []
    enough = threading.Event()

    class Rows:
        def update(self, **fields):
            beats.append(fields["heartbeat_at"])
            if len(beats) <= 2:
                raise OperationalError("server closed the connection unexpectedly")
            if len(beats) >= 5:
                enough.set()
            return 1

    heartbeat = Heartbeat(lambda: Rows(), "test")
    heartbeat.start()
    try:
        assert enough.wait(10), f"the heartbeat stopped after {len(beats)} beat(s)"
    finally:
        heartbeat.close()
    assert not heartbeat.lost
    time.sleep(0.05)
    stopped_at = len(beats)
    time.sleep(0.05)
    assert len(beats) == stopped_at  # close() still stops it


# --- list filters -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,field", [("audit", "actor"), ("audit", "object_id"), ("users", "q")], ids=["actor", "id", "users"]
)
def test_an_overlong_filter_value_is_refused_not_a_503(admin_user, client_for, name, field):
    """A 60,000-character search (a pasted blob, a crafted link) became a LIKE pattern SQLite refuses
    ("pattern too complex"): the OperationalError turned into the "database unavailable" 503 page and
    an error in the log, for a typo."""
    from studio import audit

    audit.record(admin_user, "user.updated", admin_user, fields=[])
    client = client_for(admin_user)
    for headers in ({}, {"HTTP_HX_REQUEST": "true"}):
        response = client.get(reverse(name), {field: "a" * 60000}, **headers)
        assert response.status_code == 200
        assert "at most" in response.content.decode()


# --- role changes -----------------------------------------------------------------------------------------


def test_taking_the_admin_role_from_the_first_admin_takes_effect(make_user, admin_user, client_for):
    """setup_studio's first admin is a Django superuser as well as a member of the admin group. Taking
    the admin role away only left the group: is_superuser kept every role (the users page, the audit
    log, approvals), while the edit page showed the account as a plain curator."""
    from studio.models import AuditEvent
    from studio.roles import ADMIN, has_role

    root = make_user("admin", ADMIN, is_superuser=True, is_staff=True)
    loner = make_user("root2", is_superuser=True)  # a superuser made with createsuperuser: no group
    client = client_for(admin_user)
    page = client.get(reverse("user_edit", args=[loner.pk]))
    assert page.context["form"].fields["roles"].initial == [ADMIN]  # not shown as role-less
    assert re.search(r'value="admin"[^>]*checked', page.content.decode())
    listed = {person.username: person.role_list for person in client.get(reverse("users")).context["page"]}
    assert listed["root2"] == [ADMIN]

    response = client.post(
        reverse("user_edit", args=[root.pk]),
        {"email": "admin@example.test", "first_name": "", "last_name": "", "roles": ["curator"]},
    )
    assert response.status_code == 302
    root.refresh_from_db()
    assert not root.is_superuser and not has_role(root, ADMIN)
    assert client_for(root).get(reverse("users")).status_code == 403
    event = AuditEvent.objects.get(verb="user.updated", object_id=str(root.pk))
    assert event.data["roles"] == {"before": ["admin"], "after": ["curator"]}


def test_a_sign_in_lasts_a_working_day_and_is_configurable(tmp_path, client, make_user):
    """Sessions lasted Django's default two weeks, with no setting: a bank wants a working day."""
    assert _settings_in_subprocess(tmp_path)["SESSION_COOKIE_AGE"] == 12 * 3600
    assert _settings_in_subprocess(tmp_path, STUDIO_SESSION_SECONDS="1800")["SESSION_COOKIE_AGE"] == 1800
    make_user("carla", "curator")
    response = client.post(reverse("login"), {"username": "carla", "password": TEST_PASSWORD})
    assert response.status_code == 302
    assert int(response.cookies["sessionid"]["max-age"]) == 12 * 3600
