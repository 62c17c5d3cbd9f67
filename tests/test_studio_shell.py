"""The studio shell: sign-in and its throttle, role checks on every page, user administration,
the hash-chained audit log and its tamper detection, CSRF, escaping, the 503 page, UI tags."""

from __future__ import annotations

import io
import json
import logging
import re
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.backends import ModelBackend
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection
from django.db.backends.utils import CursorWrapper
from django.template import Context, Template
from django.test import RequestFactory
from django.urls import reverse

from studio import audit
from studio.middleware import ServiceErrorMiddleware
from studio.models import AuditEvent
from studio.roles import has_role

User = get_user_model()
NEW_PASSWORD = "Quiet-Lantern-Orbit-42"


# --- helpers --------------------------------------------------------------------------------------------


@pytest.fixture
def people(curator, reviewer, engineer, admin_user):
    return {
        "anonymous": None,
        "curator": curator,
        "reviewer": reviewer,
        "engineer": engineer,
        "admin": admin_user,
    }


@pytest.fixture
def target(make_user):
    """A user for the admin pages to act on."""
    return make_user("tom", "curator")


def verify_audit() -> tuple[int, str, str]:
    """Run `manage.py verify_audit`: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("verify_audit", stdout=out, stderr=err)
    except SystemExit as exit_:
        return int(exit_.code), out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def login(client, username, password, ip="10.0.0.1"):
    return client.post(reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=ip)


def is_signed_in(client) -> bool:
    return "_auth_user_id" in client.session


# --- role matrix ------------------------------------------------------------------------------------------

ADMIN_ONLY = {"anonymous": 302, "curator": 403, "reviewer": 403, "engineer": 403, "admin": 200}
ANY_USER = {"anonymous": 302, "curator": 200, "reviewer": 200, "engineer": 200, "admin": 200}

GET_PAGES = [
    ("home", ANY_USER),
    ("users", ADMIN_ONLY),
    ("user_create", ADMIN_ONLY),
    ("user_edit", ADMIN_ONLY),
    ("audit", ADMIN_ONLY),
    ("audit_event", ADMIN_ONLY),
    ("audit_event_json", ADMIN_ONLY),
]


def _url(name, target, event):
    if name == "user_edit":
        return reverse(name, args=[target.pk])
    if name in {"audit_event", "audit_event_json"}:
        return reverse(name, args=[event.pk])
    return reverse(name)


@pytest.mark.parametrize("name,expected", GET_PAGES, ids=[name for name, _ in GET_PAGES])
@pytest.mark.parametrize("who", ["anonymous", "curator", "reviewer", "engineer", "admin"])
def test_role_matrix_get(who, name, expected, people, target, client_for):
    event = audit.record(people["admin"], "test.event", target)
    url = _url(name, target, event)
    response = client_for(people[who]).get(url)
    assert response.status_code == expected[who]
    if expected[who] == 302:
        assert response["Location"] == f"{reverse('login')}?next={url}"
    if expected[who] == 403:
        assert "needs the admin role" in response.content.decode()


POST_ACTIONS = [
    ("user_set_active", {"active": "0"}),
    ("user_password", {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}),
    ("user_edit", {"email": "tom@example.test", "roles": ["curator"]}),
    ("user_create", {"username": "newbie"}),
]


@pytest.mark.parametrize("name,data", POST_ACTIONS, ids=[name for name, _ in POST_ACTIONS])
@pytest.mark.parametrize("who", ["anonymous", "curator", "reviewer", "engineer"])
def test_role_matrix_post_refused_to_non_admins(who, name, data, people, target, client_for, user_password):
    url = reverse(name) if name == "user_create" else reverse(name, args=[target.pk])
    response = client_for(people[who]).post(url, data)
    assert response.status_code == (302 if who == "anonymous" else 403)
    if who == "anonymous":
        assert response["Location"].startswith(reverse("login"))
    target.refresh_from_db()
    assert target.is_active
    assert target.check_password(user_password)
    assert not User.objects.filter(username="newbie").exists()
    assert not AuditEvent.objects.exists()


@pytest.mark.parametrize("name", ["user_set_active", "user_password", "logout"])
def test_state_changing_urls_refuse_get(name, admin_user, target, client_for):
    url = reverse(name) if name == "logout" else reverse(name, args=[target.pk])
    assert client_for(admin_user).get(url).status_code == 405


def test_login_page_and_signed_in_redirect(curator, client_for):
    page = client_for(None).get(reverse("login"))
    assert page.status_code == 200
    assert 'autocomplete="current-password"' in page.content.decode()
    response = client_for(curator).get(reverse("login"))
    assert response.status_code == 302
    assert response["Location"] == reverse("home")


def test_user_without_a_role_sees_an_explanation(make_user, client_for):
    response = client_for(make_user("nobody")).get(reverse("home"))
    assert response.status_code == 200
    assert "You don't have a role yet" in response.content.decode()


def test_navigation_follows_roles(curator, admin_user, client_for):
    admin_page = client_for(admin_user).get(reverse("home")).content.decode()
    assert f'href="{reverse("users")}"' in admin_page
    assert f'href="{reverse("audit")}"' in admin_page
    curator_page = client_for(curator).get(reverse("home")).content.decode()
    assert f'href="{reverse("users")}"' not in curator_page
    assert f'href="{reverse("audit")}"' not in curator_page
    assert "chip-curator" in curator_page  # role chip in the top bar


# --- sign-in and its throttle ---------------------------------------------------------------------------


@pytest.fixture
def throttle(settings):
    settings.STUDIO_LOGIN_MAX_ATTEMPTS = 3
    settings.STUDIO_LOGIN_WINDOW_SECONDS = 300
    return settings


def test_login_and_logout(curator, client_for, user_password):
    client = client_for(None)
    response = login(client, "carla", user_password)
    assert response.status_code == 302
    assert response["Location"] == reverse("home")
    assert is_signed_in(client)
    assert client.post(reverse("logout")).status_code == 302
    assert not is_signed_in(client)


def test_login_locks_after_max_failures_without_checking_the_password(
    throttle, curator, client_for, user_password
):
    client = client_for(None)
    for _ in range(2):
        response = login(client, "carla", "wrong-password")
        assert response.status_code == 200
        assert "Please enter a correct username and password" in response.content.decode()
    response = login(client, "carla", "wrong-password")
    assert response.status_code == 429
    assert "Too many sign-in attempts. Try again in 5 minutes." in response.content.decode()
    assert int(response["Retry-After"]) == 300

    with mock.patch.object(ModelBackend, "authenticate", autospec=True) as authenticate:
        response = login(client, "carla", user_password)
    assert response.status_code == 429
    authenticate.assert_not_called()
    assert not is_signed_in(client)


def test_lock_is_per_username_across_addresses(throttle, curator, reviewer, client_for, user_password):
    client = client_for(None)
    for _ in range(3):
        login(client, "carla", "wrong-password", ip="10.0.0.1")
    # Same account from another address: still locked (usernames are counted across addresses).
    assert login(client_for(None), "carla", user_password, ip="10.9.9.9").status_code == 429
    # Another account from that other address: unaffected.
    other = client_for(None)
    assert login(other, "rene", user_password, ip="10.9.9.9").status_code == 302
    assert is_signed_in(other)
    # Username matching is case-insensitive, so "CARLA" does not get a fresh counter.
    assert login(client_for(None), "CARLA", user_password, ip="10.9.9.8").status_code == 429


def test_lock_per_client_address(throttle, make_user, client_for, user_password):
    throttle.STUDIO_LOGIN_MAX_ATTEMPTS_PER_IP = 4
    make_user("victim", "curator")
    client = client_for(None)
    for name in ("u1", "u2", "u3"):
        assert login(client, name, "guess", ip="192.0.2.7").status_code == 200
    assert login(client, "u4", "guess", ip="192.0.2.7").status_code == 429
    # The address is locked for every account, even with the right password…
    assert login(client, "victim", user_password, ip="192.0.2.7").status_code == 429
    # …while the account itself can still sign in from elsewhere.
    assert login(client_for(None), "victim", user_password, ip="198.51.100.1").status_code == 302


def test_successful_login_clears_the_username_counter(throttle, curator, client_for, user_password):
    client = client_for(None)
    for _ in range(2):
        login(client, "carla", "wrong-password", ip="10.0.0.1")
    assert login(client, "carla", user_password, ip="10.0.0.1").status_code == 302
    client.post(reverse("logout"))
    # Two more failures from a fresh address: below the limit again because the counter was cleared.
    for _ in range(2):
        assert login(client, "carla", "wrong-password", ip="10.0.0.2").status_code == 200


def test_lock_ends_with_the_window(throttle, curator, client_for, user_password):
    client = client_for(None)
    for _ in range(3):
        login(client, "carla", "wrong-password")
    assert login(client, "carla", user_password).status_code == 429
    import time as real_time

    later = real_time.time() + 301
    with mock.patch("studio.ratelimit.time.time", return_value=later):
        assert login(client, "carla", user_password).status_code == 302


def test_inactive_user_cannot_sign_in(make_user, client_for, user_password):
    make_user("gone", "curator", is_active=False)
    client = client_for(None)
    assert login(client, "gone", user_password).status_code == 200
    assert not is_signed_in(client)


# --- user administration ----------------------------------------------------------------------------------


def test_admin_creates_a_user_with_roles_and_an_audit_event(admin_user, client_for):
    client = client_for(admin_user)
    response = client.post(
        reverse("user_create"),
        {
            "username": "nina",
            "email": "nina@example.test",
            "first_name": "Nina",
            "last_name": "",
            "password1": NEW_PASSWORD,
            "password2": NEW_PASSWORD,
            "roles": ["curator", "reviewer"],
        },
    )
    nina = User.objects.get(username="nina")
    assert response.status_code == 302
    assert response["Location"] == reverse("user_edit", args=[nina.pk])
    assert nina.check_password(NEW_PASSWORD)
    assert has_role(nina, "curator") and has_role(nina, "reviewer") and not has_role(nina, "engineer")

    event = AuditEvent.objects.get(verb="user.created")
    assert event.actor == admin_user
    assert (event.object_type, event.object_id) == ("user", str(nina.pk))
    assert event.data["roles"] == ["curator", "reviewer"]
    assert NEW_PASSWORD not in json.dumps(event.data)
    assert verify_audit()[0] == 0

    page = client.get(reverse("user_edit", args=[nina.pk])).content.decode()
    assert "Created nina." in page  # toast


def test_user_create_rejects_weak_password_and_duplicates(admin_user, target, client_for):
    client = client_for(admin_user)
    data = {"username": "weak", "password1": "password", "password2": "password", "roles": ["curator"]}
    response = client.post(reverse("user_create"), data)
    assert response.status_code == 200
    assert "This password is too short" in response.content.decode()
    data = {"username": "TOM", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD, "roles": ["curator"]}
    response = client.post(reverse("user_create"), data)
    assert "A user with that username already exists." in response.content.decode()
    data = {"username": "norole", "password1": NEW_PASSWORD, "password2": NEW_PASSWORD}
    response = client.post(reverse("user_create"), data)
    assert "Give the user at least one role." in response.content.decode()
    assert not User.objects.filter(username__in=["weak", "norole"]).exists()
    assert not AuditEvent.objects.exists()


def test_edit_roles_records_before_and_after(admin_user, target, client_for):
    client = client_for(admin_user)
    response = client.post(
        reverse("user_edit", args=[target.pk]),
        {"email": "tom@new.example", "first_name": "", "last_name": "", "roles": ["engineer", "reviewer"]},
    )
    assert response.status_code == 302
    target.refresh_from_db()
    assert has_role(target, "engineer") and has_role(target, "reviewer")
    target = User.objects.get(pk=target.pk)  # fresh permission cache
    assert not has_role(target, "curator")
    event = AuditEvent.objects.get(verb="user.updated")
    assert event.data["roles"] == {"before": ["curator"], "after": ["reviewer", "engineer"]}
    assert event.data["fields"] == ["email"]
    assert "tom@new.example" not in json.dumps(event.data)  # field names only, no personal data

    # Saving again without a change writes nothing.
    client.post(
        reverse("user_edit", args=[target.pk]),
        {"email": "tom@new.example", "first_name": "", "last_name": "", "roles": ["reviewer", "engineer"]},
    )
    assert AuditEvent.objects.filter(verb="user.updated").count() == 1
    assert verify_audit()[0] == 0


def test_admin_cannot_remove_own_admin_role(admin_user, client_for):
    response = client_for(admin_user).post(
        reverse("user_edit", args=[admin_user.pk]), {"email": "ada@example.test", "roles": ["curator"]}
    )
    assert response.status_code == 200
    assert "You can&#x27;t remove your own admin role" in response.content.decode()
    assert has_role(User.objects.get(pk=admin_user.pk), "admin")
    assert not AuditEvent.objects.exists()


def test_deactivate_and_reactivate(admin_user, target, client_for, user_password):
    admin = client_for(admin_user)
    victim_session = client_for(target)
    assert victim_session.get(reverse("home")).status_code == 200

    response = admin.post(reverse("user_set_active", args=[target.pk]), {"active": "0"})
    assert response.status_code == 302
    target.refresh_from_db()
    assert not target.is_active
    assert victim_session.get(reverse("home")).status_code == 302  # signed out at once
    assert login(client_for(None), "tom", user_password).status_code == 200  # and can't sign in

    admin.post(reverse("user_set_active", args=[target.pk]), {"active": "1"})
    target.refresh_from_db()
    assert target.is_active
    verbs = list(AuditEvent.objects.order_by("id").values_list("verb", flat=True))
    assert verbs == ["user.deactivated", "user.reactivated"]
    assert verify_audit()[0] == 0


def test_admin_cannot_deactivate_themselves(admin_user, client_for):
    client = client_for(admin_user)
    response = client.post(reverse("user_set_active", args=[admin_user.pk]), {"active": "0"}, follow=True)
    assert "You can&#x27;t deactivate your own account" in response.content.decode()
    admin_user.refresh_from_db()
    assert admin_user.is_active
    assert not AuditEvent.objects.exists()


def test_reset_password(admin_user, target, client_for):
    client = client_for(admin_user)
    response = client.post(
        reverse("user_password", args=[target.pk]),
        {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
    )
    assert response.status_code == 302
    target.refresh_from_db()
    assert target.check_password(NEW_PASSWORD)
    event = AuditEvent.objects.get(verb="user.password_reset")
    assert NEW_PASSWORD not in json.dumps(event.data)

    weak = client.post(
        reverse("user_password", args=[target.pk]), {"new_password1": "abc", "new_password2": "abc"}
    )
    assert weak.status_code == 200
    assert "This password is too short" in weak.content.decode()


def test_users_list_filters_and_htmx_partial(admin_user, target, make_user, client_for):
    make_user("olga", "engineer", is_active=False)
    client = client_for(admin_user)
    page = client.get(reverse("users")).content.decode()
    assert "tom" in page and "olga" in page and "<html" in page
    fragment = client.get(reverse("users"), {"role": "engineer"}, HTTP_HX_REQUEST="true")
    html = fragment.content.decode()
    assert "<html" not in html
    assert "olga" in html and ">tom<" not in html
    assert "HX-Request" in fragment["Vary"]
    inactive = client.get(reverse("users"), {"status": "inactive"}).content.decode()
    assert "olga" in inactive and ">tom<" not in inactive


# --- audit log page and tamper detection ----------------------------------------------------------------


def test_audit_page_shows_intact_chain_and_filters(admin_user, target, client_for):
    audit.record(admin_user, "dataset.frozen", target, rows=3)
    audit.record(admin_user, "user.updated", target)
    audit.record("worker", "job.failed", None)
    client = client_for(admin_user)
    page = client.get(reverse("audit")).content.decode()
    assert "Chain intact, 3 events." in page

    fragment = client.get(reverse("audit"), {"verb": "job.failed"}, HTTP_HX_REQUEST="true")
    html = fragment.content.decode()
    assert "<html" not in html and "Chain intact" not in html
    assert "job.failed" in html and "dataset.frozen" not in html

    by_object = client.get(
        reverse("audit"), {"object_type": "user", "object_id": str(target.pk)}
    ).content.decode()
    assert "dataset.frozen" in by_object and "job.failed" not in by_object.split("<tbody>")[1]
    by_actor = client.get(reverse("audit"), {"actor": "work"}).content.decode()
    assert (
        "job.failed" in by_actor.split("<tbody>")[1] and "dataset.frozen" not in by_actor.split("<tbody>")[1]
    )

    bad_range = client.get(reverse("audit"), {"since": "2030-01-02", "until": "2030-01-01"}).content.decode()
    assert "The end date is before the start date." in bad_range


def test_verify_audit_reports_an_intact_chain(admin_user, target):
    for verb in ("a.one", "a.two", "a.three"):
        audit.record(admin_user, verb, target)
    status, out, _ = verify_audit()
    assert status == 0
    head = AuditEvent.objects.order_by("-id").first()
    assert out.strip().splitlines() == [
        "Audit chain intact: 3 events checked.",
        f"Head: event #{head.pk} {head.hash}",
    ]


def test_edited_event_is_detected(admin_user, target, client_for):
    events = [audit.record(admin_user, f"step.{i}", target, n=i) for i in range(4)]
    edited = events[2]
    AuditEvent.objects.filter(pk=edited.pk).update(data={"n": 99})  # bypasses save()

    status, _, err = verify_audit()
    assert status == 1
    assert err.strip().startswith(f"Audit chain broken at event #{edited.pk}:")
    assert "edited" in err
    page = client_for(admin_user).get(reverse("audit")).content.decode()
    assert (
        f'Chain broken at event <a href="{reverse("audit_event", args=[edited.pk])}">#{edited.pk}</a>' in page
    )
    detail = client_for(admin_user).get(reverse("audit_event", args=[edited.pk])).content.decode()
    assert "does not match its hash" in detail


def test_deleted_event_is_detected(admin_user, target):
    events = [audit.record(admin_user, f"step.{i}", target) for i in range(4)]
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {table} WHERE id = %s", [events[1].pk])  # noqa: S608 - constant table name
    status, _, err = verify_audit()
    assert status == 1
    assert f"Audit chain broken at event #{events[2].pk}:" in err
    assert "deleted or inserted" in err


def test_deleted_newest_events_are_detected_against_a_recorded_head(admin_user, target):
    events = [audit.record(admin_user, f"step.{i}", target) for i in range(4)]
    out, err = io.StringIO(), io.StringIO()
    call_command("verify_audit", "--expect", events[3].hash, stdout=out, stderr=err)
    assert "Audit chain intact: 4 events checked." in out.getvalue()
    table = connection.ops.quote_name(AuditEvent._meta.db_table)
    with connection.cursor() as cursor:  # the newest two: what is left still links up
        cursor.execute(f"DELETE FROM {table} WHERE id >= %s", [events[2].pk])  # noqa: S608 - constant table name
    assert verify_audit()[0] == 0  # without a recorded head the chain cannot tell
    with pytest.raises(SystemExit) as exit_:
        call_command("verify_audit", "--expect", events[3].hash, stdout=out, stderr=err)
    assert exit_.value.code == 1
    assert "Audit chain truncated" in err.getvalue() and "no longer in the log" in err.getvalue()


def test_a_user_with_audit_events_is_kept_so_the_chain_stays_intact(admin_user, target):
    from django.db.models import ProtectedError

    audit.record(target, "x.by_tom")
    with pytest.raises(ProtectedError):
        target.delete()
    assert verify_audit()[0] == 0


def test_audit_events_cannot_be_changed_through_the_orm(admin_user):
    event = audit.record(admin_user, "x.y")
    with pytest.raises(PermissionError):
        event.save()
    with pytest.raises(PermissionError):
        event.delete()


# --- CSRF -------------------------------------------------------------------------------------------------


def test_csrf_enforced_on_logout(curator, client_for):
    client = client_for(curator, enforce_csrf_checks=True)
    assert client.post(reverse("logout")).status_code == 403
    assert client.get(reverse("home")).status_code == 200  # still signed in
    client.get(reverse("home"))
    token = client.cookies["csrftoken"].value
    assert client.post(reverse("logout"), {"csrfmiddlewaretoken": token}).status_code == 302
    assert client.get(reverse("home")).status_code == 302


def test_csrf_enforced_on_user_edit(admin_user, target, client_for):
    client = client_for(admin_user, enforce_csrf_checks=True)
    data = {"email": "x@example.test", "roles": ["engineer"]}
    assert client.post(reverse("user_edit", args=[target.pk]), data).status_code == 403
    assert client.post(reverse("user_set_active", args=[target.pk]), {"active": "0"}).status_code == 403
    target.refresh_from_db()
    assert target.is_active and target.email == "tom@example.test"

    page = client.get(reverse("user_edit", args=[target.pk]))
    token = client.cookies["csrftoken"].value
    assert "csrfmiddlewaretoken" in page.content.decode()
    # HTMX requests send the token in a header (hx-headers on <body>).
    assert 'hx-headers=\'{"X-CSRFToken": "' in page.content.decode()
    response = client.post(reverse("user_edit", args=[target.pk]), data, HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 302


# --- escaping ---------------------------------------------------------------------------------------------

XSS = "<script>alert(1)</script>"


def test_user_data_is_escaped(admin_user, roles, client_for):
    evil = User.objects.create_user(username=XSS, first_name='<img src=x onerror="alert(2)">', password="x")
    evil.groups.add(roles["curator"])
    admin = client_for(admin_user)
    for url in (reverse("users"), reverse("user_edit", args=[evil.pk])):
        html = admin.get(url).content.decode()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert XSS not in html
        assert "<img src=x" not in html
    # The top bar shows the signed-in user's own name escaped too.
    home = client_for(evil).get(reverse("home")).content.decode()
    assert "<img src=x" not in home and "&lt;img src=x" in home


def test_audit_data_is_escaped(admin_user, client_for):
    event = audit.record(admin_user, "note.added", None, note=XSS, **{"<b>key</b>": "v"})
    client = client_for(admin_user)
    for url in (reverse("audit"), reverse("audit_event", args=[event.pk]), reverse("home")):
        html = client.get(url).content.decode()
        assert XSS not in html
        assert "<b>key</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in client.get(reverse("audit")).content.decode()
    raw = client.get(reverse("audit_event_json", args=[event.pk]))
    assert raw["Content-Type"] == "application/json"
    assert b"<script>" not in raw.content
    assert json.loads(raw.content)["data"]["note"] == XSS


# --- 503 when a backing service is down ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("could not connect to server"),
        pytest.param("redis", id="redis"),
        pytest.param("kombu", id="kombu"),
    ],
)
def test_service_errors_become_a_503_page(error):
    if error == "redis":
        from redis.exceptions import ConnectionError as RedisConnectionError

        error = RedisConnectionError("Connection refused")
    elif error == "kombu":
        from kombu.exceptions import OperationalError as KombuOperationalError

        error = KombuOperationalError("broker down")
    middleware = ServiceErrorMiddleware(lambda request: None)
    response = middleware.process_exception(RequestFactory().get("/"), error)
    assert response.status_code == 503
    assert response["Retry-After"] == "60"
    body = response.content.decode()
    assert (
        "The studio can't reach its database/queue right now. Your data is safe; try again in a minute."
        in body
    )


def test_other_errors_are_left_alone():
    middleware = ServiceErrorMiddleware(lambda request: None)
    assert middleware.process_exception(RequestFactory().get("/"), ValueError("bug")) is None


def test_database_down_gives_503_through_the_whole_stack(curator, client_for, caplog):
    client = client_for(curator)
    boom = OperationalError("connection to server at 10.1.2.3 failed: password authentication failed")
    with mock.patch.object(CursorWrapper, "execute", side_effect=boom), caplog.at_level(logging.ERROR):
        response = client.get(reverse("home") + "?secret=hunter2")
    assert response.status_code == 503
    assert "can't reach its database/queue" in response.content.decode()
    assert "django.db.utils.OperationalError" in caplog.text
    assert "hunter2" not in caplog.text and "10.1.2.3" not in caplog.text


# --- management commands ------------------------------------------------------------------------------------


def test_create_user_command_generates_and_prints_a_password(roles):
    out = io.StringIO()
    call_command("create_user", "zoe", "--role", "engineer", "--role", "reviewer", stdout=out)
    text = out.getvalue()
    assert "Created user zoe (roles: reviewer, engineer)." in text
    password = re.search(r"Password: (\S+)", text).group(1)
    zoe = User.objects.get(username="zoe")
    assert zoe.check_password(password)
    assert has_role(zoe, "engineer") and has_role(zoe, "reviewer") and not has_role(zoe, "admin")
    event = AuditEvent.objects.get(verb="user.created")
    assert event.actor_name == "manage.py create_user"
    assert password not in json.dumps(event.data)


def test_create_user_command_validates(roles):
    call_command("create_user", "yan", "--role", "admin", "--password", NEW_PASSWORD, stdout=io.StringIO())
    assert User.objects.get(username="yan").check_password(NEW_PASSWORD)
    with pytest.raises(CommandError, match="too short"):
        call_command("create_user", "xia", "--role", "curator", "--password", "short", stdout=io.StringIO())
    with pytest.raises(CommandError, match="already exists"):
        call_command("create_user", "YAN", "--role", "curator", stdout=io.StringIO())


# --- UI tags ------------------------------------------------------------------------------------------------


def render(source: str, **context) -> str:
    return Template("{% load studio_ui %}" + source).render(Context(context))


def test_histogram_renders_one_bar_per_bin():
    bins = [(0, 10, 3), (10, 20, 7), (20, 30, 0), (30, 40, 12), (40, 50, 1)]
    html = render('{% histogram bins title="Tokens" x_label="tokens" %}', bins=bins)
    assert html.count('class="bar"') == 5
    assert '<svg class="chart-svg"' in html and 'role="img"' in html
    assert "<title>10–20: 7</title>" in html
    assert "Tokens" in html and "5 bins from 0 to 50" in html
    assert html.count("<tr>") == 1 + 5  # data table: header + one row per bin


def test_histogram_handles_uneven_and_open_bins_and_empty_data():
    html = render("{% histogram bins %}", bins=[(0, 1, 2), (1, 100, 5), (100, None, 1)])
    assert html.count('class="bar"') == 3 and "∞" in html
    assert "No data to chart yet." in render("{% histogram bins %}", bins=[])


def test_line_chart_draws_each_series_with_tooltips():
    curves = {
        "train": [(step, 2.0 / (step + 1)) for step in range(0, 500, 5)],
        "eval": [(100, 0.4), (200, 0.3)],
    }
    html = render('{% line_chart curves title="Loss" y_label="loss" %}', curves=curves)
    assert html.count('class="line"') == 2
    assert "chart-legend" in html
    assert "<title>eval — Step 200: 0.3</title>" in html
    assert "No data to chart yet." in render("{% line_chart s %}", s=[])
    single = render("{% line_chart s log_y=True %}", s=[1.0, 0.5, 0.25])
    assert single.count('class="line"') == 1 and "chart-legend" not in single
    assert 'fill-opacity="1"' not in single  # markers of a line show on hover only
    lone = render("{% line_chart s %}", s={"train": [(1, 2.0), (2, 1.5)], "eval": [(2, 1.7)]})
    assert lone.count('fill-opacity="1"') == 1  # a one-point series has no line: its marker is drawn


def test_progress_bar_and_status_badge():
    html = render("{% progress_bar 45 running=True label='Epoch 1' %}")
    assert 'aria-valuenow="45.0"' in html and "progress-running" in html and "45%" in html
    assert 'style="width: 50.0%"' in render("{% progress_bar 0.5 total=1 %}")
    assert "progress-indeterminate" in render("{% progress_bar None %}")
    assert 'class="badge badge-danger"' in render("{% status_badge 'failed' %}")
    assert "badge-busy" in render("{% status_badge 'running' %}")
    assert "&lt;x&gt;" in render("{% status_badge s %}", s="<x>")
    assert render("{{ 3725|duration }}") == "1h 02m"


def test_navigation_skips_areas_whose_urls_are_missing(admin_user, client_for):
    from studio.context_processors import build_navigation, first_url

    assert first_url("no-such:page", "home") == reverse("home")
    assert first_url("no-such:page") is None
    sections = build_navigation("/users/", ["curator", "reviewer", "engineer", "admin"])
    links = {link.label: link for section in sections for link in section.links}
    assert links["Users"].active and not links["Dashboard"].active
    for label, link in links.items():
        assert link.url, label  # every entry shown has a working URL
    assert client_for(admin_user).get(reverse("home")).status_code == 200


def test_only_the_most_specific_navigation_link_is_active():
    from studio.context_processors import build_navigation
    from studio.roles import ROLES

    def active(path):
        return [link.label for s in build_navigation(path, list(ROLES)) for link in s.links if link.active]

    assert active("/models/reviews/") == ["Reviews"]
    assert active("/models/promotions/3/") == ["Promotions"]
    assert active("/models/1/") == ["Models"]
    assert active("/") == ["Dashboard"]
