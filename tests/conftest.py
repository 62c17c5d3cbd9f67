"""Shared fixtures for the whole suite.

Sections: isolation (cache) · roles and users · clients. Feature-specific fixtures go at the end of
this file under their own header, or into a conftest.py next to the tests that use them.
"""

from __future__ import annotations

import uuid

import pytest
from django.test import Client

from studio.roles import ADMIN, CURATOR, ENGINEER, REVIEWER, ensure_groups

TEST_PASSWORD = "Correct-Horse-Battery-9"  # passes the configured password validators

# =====================================================================================================
# Isolation
# =====================================================================================================


@pytest.fixture(autouse=True)
def _isolated_cache(settings):
    """Each test gets its own empty in-memory cache (login throttling, progress…), never var/cache."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": f"test-{uuid.uuid4().hex}",
        }
    }
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """PBKDF2 at production strength costs ~0.3 s per user; tests only need hashing to work."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


# =====================================================================================================
# Roles and users
# =====================================================================================================


@pytest.fixture
def roles(db):
    """The four role groups with their permissions: {"curator": Group, …}."""
    return ensure_groups()


@pytest.fixture
def make_user(roles, django_user_model):
    """Factory: `make_user("alice", "curator", "reviewer", password=..., **user_fields)`.

    Every user gets the password TEST_PASSWORD unless told otherwise and an email derived from the
    username.
    """

    def make(username: str, *role_names: str, password: str = TEST_PASSWORD, **fields):
        fields.setdefault("email", f"{username}@example.test")
        user = django_user_model.objects.create_user(username=username, password=password, **fields)
        if role_names:
            user.groups.add(*(roles[name] for name in role_names))
        return user

    return make


@pytest.fixture
def user_password():
    """The password `make_user` gives every user unless told otherwise."""
    return TEST_PASSWORD


@pytest.fixture
def curator(make_user):
    return make_user("carla", CURATOR, first_name="Carla")


@pytest.fixture
def reviewer(make_user):
    return make_user("rene", REVIEWER, first_name="René")


@pytest.fixture
def engineer(make_user):
    return make_user("erin", ENGINEER, first_name="Erin")


@pytest.fixture
def admin_user(make_user):
    """An admin by role (group), not a Django superuser: role checks are exercised for real.

    Overrides pytest-django's fixture of the same name (so its `admin_client` uses this user too).
    """
    return make_user("ada", ADMIN, first_name="Ada")


# =====================================================================================================
# Clients
# =====================================================================================================


@pytest.fixture
def client_for():
    """`client_for(user)` → a Client already signed in as `user` (`client_for(None)`: anonymous).

    Pass `enforce_csrf_checks=True` to test CSRF protection."""

    def make(user=None, **client_kwargs) -> Client:
        client = Client(**client_kwargs)
        if user is not None:
            client.force_login(user)
        return client

    return make


# =====================================================================================================
# Datasets: a private data dir per test
# =====================================================================================================


@pytest.fixture(autouse=True)
def _isolated_data_dir(settings, tmp_path):
    """Uploads, encrypted originals and rejected lines of a test go to its own tmp dir."""
    settings.DATA_DIR = tmp_path / "studio-data"
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "studio-data" / "tmp")
    (tmp_path / "studio-data" / "tmp").mkdir(parents=True)
    return settings.DATA_DIR
