"""Role matrix for every datasets and base-model URL: anonymous → login, wrong role → 403."""

from __future__ import annotations

import pytest
from django.urls import reverse

from datasets_app.models import DuplicateGroup, Example, PiiFinding
from datasets_app.services import datasets, imports, versions

pytestmark = pytest.mark.django_db

CURATOR_ONLY = {"curator": 200, "engineer": 403, "reviewer": 403, "admin": 200}
READERS = {"curator": 200, "engineer": 200, "reviewer": 403, "admin": 200}


@pytest.fixture
def world(curator, tmp_path):
    ds = datasets.create_dataset("Matrix", "sft", curator)
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        "broken\n"
    )
    upload = imports.receive_path(ds, curator, path)
    imports.process(upload.pk)
    Example.objects.update(pii_status=Example.Pii.CLEAN)
    ex = Example.objects.first()
    finding = PiiFinding.objects.create(
        example=ex, dataset=ds, segment=0, start=0, end=2, entity_type="PERSON", source="test"
    )
    group = DuplicateGroup.objects.create(dataset=ds, kind="exact")
    Example.objects.update(duplicate_group=group)
    finding.decision = "keep"
    finding.save()
    version = versions.freeze(ds, curator)
    return {"ds": ds, "upload": upload, "ex": ex, "finding": finding, "group": group, "version": version}


def get_urls(w):
    ds, v = w["ds"].pk, w["version"].pk
    return [
        (reverse("datasets:list"), READERS),
        (reverse("datasets:create"), CURATOR_ONLY),
        (reverse("datasets:detail", args=[ds]), READERS),
        (reverse("datasets:scan_status", args=[ds]), READERS),
        (reverse("datasets:settings", args=[ds]), CURATOR_ONLY),
        (reverse("datasets:upload_new", args=[ds]), CURATOR_ONLY),
        (reverse("datasets:pii", args=[ds]), CURATOR_ONLY),
        (reverse("datasets:examples", args=[ds]), CURATOR_ONLY),
        (reverse("datasets:duplicates", args=[ds]), CURATOR_ONLY),
        (reverse("datasets:upload", args=[w["upload"].pk]), CURATOR_ONLY),
        (reverse("datasets:upload_rejects", args=[w["upload"].pk]), CURATOR_ONLY),
        (reverse("datasets:example", args=[w["ex"].pk]), CURATOR_ONLY),
        (reverse("datasets:version", args=[v]), READERS),
        (reverse("datasets:version_export", args=[v]), READERS),
        (reverse("datasets:version_diff", args=[v, v]), READERS),
        (reverse("training:base_models"), READERS),
    ]


def post_urls(w):
    ds = w["ds"].pk
    return [
        reverse("datasets:pii_decide", args=[ds]),
        reverse("datasets:pii_decide_type", args=[ds]),
        reverse("datasets:pii_rescan", args=[ds]),
        reverse("datasets:duplicate_decide_all", args=[ds]),
        reverse("datasets:split", args=[ds]),
        reverse("datasets:freeze", args=[ds]),
        reverse("datasets:example_mark", args=[w["ex"].pk]),
        reverse("datasets:example_drop", args=[w["ex"].pk]),
        reverse("datasets:duplicate_decide", args=[w["group"].pk]),
    ]


def test_get_matrix(world, client, make_user, client_for):
    users = {role: make_user(f"m-{role}", role) for role in ("curator", "engineer", "reviewer", "admin")}
    for url, expected in get_urls(world):
        anon = client.get(url)
        assert anon.status_code == 302 and "/login/" in anon["Location"], url
        for role, status in expected.items():
            got = client_for(users[role]).get(url).status_code
            assert got == status, f"{role} GET {url}: {got} != {status}"


def test_post_matrix(world, client, make_user, client_for):
    users = {role: make_user(f"p-{role}", role) for role in ("engineer", "reviewer")}
    for url in post_urls(world):
        assert client.post(url).status_code == 302, url
        for role, user in users.items():
            assert client_for(user).post(url).status_code == 403, f"{role} POST {url}"
    # mutations refuse GET
    curator_client = client_for(make_user("g-curator", "curator"))
    for url in post_urls(world):
        assert curator_client.get(url).status_code == 405, url


def test_base_model_retire_is_admin_only(world, admin_user, curator, client_for):
    from training_app.models import BaseModel

    model = BaseModel.objects.create(
        name="Tiny", source_kind="local_dir", source="/nonexistent", context_length=128
    )
    url = reverse("training:base_model_status", args=[model.pk])
    assert client_for(curator).post(url, {"status": "retired"}).status_code == 403
    assert client_for(admin_user).post(url, {"status": "retired"}).status_code == 302
    model.refresh_from_db()
    assert model.status == "retired"


def test_csrf_enforced_on_dataset_mutations(world, curator):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(curator)
    assert client.post(reverse("datasets:freeze", args=[world["ds"].pk])).status_code == 403
