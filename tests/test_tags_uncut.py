"""Every tag of an example can be filtered on: tags_text is no longer cut at 1,000 characters."""

from __future__ import annotations

import importlib
import json

import pytest
from django.apps import apps
from django.urls import reverse

from datasets_app.models import Example
from datasets_app.services import datasets, imports

pytestmark = pytest.mark.django_db

CHAT = [{"role": "user", "content": "Status of ticket TCK-1?"}, {"role": "assistant", "content": "Closed."}]
MANY_TAGS = [f"team-{i:03d}-queue" for i in range(150)]  # about 2,400 characters of tags_text


def test_a_tag_past_the_first_thousand_characters_is_found(curator, client_for, tmp_path):
    ds = datasets.create_dataset("Many tags", "sft", curator)
    path = tmp_path / "tags.jsonl"
    rows = [{"messages": CHAT, "tags": MANY_TAGS}, {"messages": CHAT, "tags": ["team-000-queue"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert imports.process(imports.receive_path(ds, curator, path).pk).imported == 2
    first = Example.objects.get(dataset=ds, source_line=1)
    assert len(first.tags_text) > 2000 and first.tags_text.endswith("|team-149-queue|")
    client = client_for(curator)
    url = reverse("datasets:examples", args=[ds.pk])
    last = client.get(url, {"tag": "team-149-queue"})
    assert last.status_code == 200 and f"/examples/{first.pk}/" in last.content.decode()
    assert last.context["page"].paginator.count == 1
    assert client.get(url, {"tag": "team-000-queue"}).context["page"].paginator.count == 2
    # an edit that adds one more tag past the old cut is found too
    datasets.edit_example(first, messages=first.messages, tags=[*MANY_TAGS, "late-tag"], user=curator)
    assert client.get(url, {"tag": "late-tag"}).context["page"].paginator.count == 1


def test_the_migration_rebuilds_rows_that_were_cut(curator):
    ds = datasets.create_dataset("Cut before", "sft", curator)
    cut = Example.objects.create(
        dataset=ds, position=0, messages=CHAT, tags=MANY_TAGS, tags_text=imports.tags_text(MANY_TAGS)[:1000]
    )
    short = Example.objects.create(dataset=ds, position=1, messages=CHAT, tags=["a"], tags_text="|a|")
    Example.objects.filter(pk=cut.pk).update(tags_text=imports.tags_text(MANY_TAGS)[:1000])
    migration = importlib.import_module("datasets_app.migrations.0005_tags_text_uncut")
    migration.rebuild_cut_tags_text(apps, None)
    cut.refresh_from_db()
    short.refresh_from_db()
    assert cut.tags_text == imports.tags_text(MANY_TAGS) and len(cut.tags_text) > 1000
    assert short.tags_text == "|a|"
