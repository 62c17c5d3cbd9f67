"""`setup_studio` (what `make run` does after migrating) is idempotent."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management import call_command

from datasets_app.models import Dataset, Example, Upload

pytestmark = pytest.mark.django_db


def test_setup_creates_roles_admin_and_demo_once(monkeypatch):
    monkeypatch.delenv("STUDIO_ADMIN_PASSWORD", raising=False)
    out = StringIO()
    call_command("setup_studio", "--skip-model", stdout=out, stderr=StringIO())
    text = out.getvalue()
    assert "Created the first admin 'admin' with password: " in text
    password = text.split("password: ", 1)[1].split()[0]
    admin = get_user_model().objects.get(username="admin")
    assert admin.check_password(password) and admin.groups.filter(name="admin").exists()
    assert set(Group.objects.values_list("name", flat=True)) == {"curator", "reviewer", "engineer", "admin"}
    demo = Dataset.objects.get()
    upload = Upload.objects.get()
    assert upload.status == "imported" and upload.rejected_count == 3
    assert demo.examples.count() == upload.imported_count > 50
    assert demo.findings.filter(decision="pending").exists()
    assert demo.duplicate_groups.exists()
    assert not Example.objects.filter(pii_status="unscanned").exists()
    # held-out splits for evaluation runs on a version frozen from the demo
    splits = {s: demo.examples.filter(split=s).count() for s in ("train", "eval", "golden")}
    assert splits["eval"] >= 5 and splits["golden"] >= 5 and splits["train"] > 40, splits
    assert f"{splits['eval']} eval, {splits['golden']} golden" in text

    again = StringIO()
    call_command("setup_studio", "--skip-model", stdout=again, stderr=StringIO())
    assert "Created the first admin" not in again.getvalue()
    assert (
        get_user_model().objects.count() == 1 and Dataset.objects.count() == 1 and Upload.objects.count() == 1
    )


def test_admin_password_from_environment(monkeypatch):
    monkeypatch.setenv("STUDIO_ADMIN_PASSWORD", "From-The-Env-42")
    out = StringIO()
    call_command("setup_studio", "--skip-model", "--skip-demo", stdout=out, stderr=StringIO())
    assert "From-The-Env-42" not in out.getvalue()
    assert get_user_model().objects.get(username="admin").check_password("From-The-Env-42")
