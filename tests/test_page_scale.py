"""Curation pages and actions at scale, without 100,000 rows: the number of queries of every listing
page stays the same whether a dataset holds a handful of examples, findings, groups and versions or ten
times more (no query per row shown or stored), bulk actions run a bounded number of queries per item,
and the export streams.

The figures at 100,000 examples come from a hand-run measurement (see the report of this change); these
tests guard the shapes that made them: aggregation in SQL, a page's rows fetched in one query each,
batched writes."""

from __future__ import annotations

import hashlib
import json

import pytest
from django.db import connection
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from datasets_app.models import (
    Dataset,
    DatasetVersion,
    DuplicateGroup,
    Example,
    PiiFinding,
    Upload,
    VersionExample,
)
from datasets_app.services import datasets, duplicates, versions
from studio.models import AuditEvent

pytestmark = pytest.mark.django_db

SMALL, LARGE = 5, 200  # a page's worth of rows or fewer, then several pages of them


def _messages(i: int, text: str = "") -> list[dict]:
    return [
        {"role": "user", "content": f"#{i} where is my parcel {text}".strip()},
        {"role": "assistant", "content": f"it ships tomorrow, order {i}"},
    ]


def build(name: str, n: int, user, *, findings: bool = True) -> Dataset:
    """A dataset of ``n`` active examples (tags, the three splits, an email in each) with ``n`` findings
    (some decided), ``n`` // 2 pending duplicate groups of two examples each, and uploads."""
    dataset = datasets.create_dataset(name, "sft", user)
    for _ in range(1 + n // 20):  # the dataset page lists the last 10
        Upload.objects.create(
            dataset=dataset, original_name="f.jsonl", status=Upload.Status.IMPORTED, uploaded_by=user
        )
    examples = Example.objects.bulk_create(
        Example(
            dataset=dataset,
            position=i,
            messages=_messages(i, f"mail me at person{i}@example.com"),
            tags=[f"t{i % 7}", "common"],
            tags_text=f"|t{i % 7}|common|",
            split=("train", "eval", "golden")[i % 3],
            content_hash=f"{i:064x}",
            token_count=10 + i % 50,
            pii_status=Example.Pii.PENDING if findings else Example.Pii.CLEAN,
        )
        for i in range(n)
    )
    if findings:
        PiiFinding.objects.bulk_create(
            PiiFinding(
                example=ex,
                dataset=dataset,
                segment=0,
                start=len(ex.messages[0]["content"]) - len(f"person{i}@example.com"),
                end=len(ex.messages[0]["content"]),
                entity_type=("EMAIL_ADDRESS", "PERSON")[i % 2],
                source="test",
                decision=PiiFinding.Decision.REDACT if i % 5 == 4 else PiiFinding.Decision.PENDING,
                replacement="<EMAIL_1>" if i % 5 == 4 else "",
            )
            for i, ex in enumerate(examples)
        )
    for i in range(n // 2):
        group = DuplicateGroup.objects.create(dataset=dataset, kind=DuplicateGroup.Kind.EXACT)
        Example.objects.filter(pk__in=[examples[2 * i].pk, examples[2 * i + 1].pk]).update(
            duplicate_group=group
        )
    return dataset


def frozen_pair(dataset: Dataset, user) -> tuple[DatasetVersion, DatasetVersion]:
    """Two versions of the dataset that differ in about a third of their examples each way."""
    made = []
    for number, (lo, hi) in enumerate([(0, 2), (1, 3)], start=1):
        version = DatasetVersion.objects.create(
            dataset=dataset, number=number, kind=dataset.kind, sha256="0" * 64, counts={"examples": 0}
        )
        rows = list(dataset.examples.order_by("position"))
        n = len(rows)
        chosen = rows[lo * n // 3 : hi * n // 3]
        VersionExample.objects.bulk_create(
            VersionExample(
                version=version,
                example_id=ex.pk,
                position=p,
                messages=ex.messages,
                tags=ex.tags,
                split=ex.split,
                token_count=ex.token_count,
                # the middle third is in both: changed in the second version for half of it
                digest=f"{number if ex.position % 2 else 0}-{ex.pk}",
            )
            for p, ex in enumerate(chosen)
        )
        made.append(version)
    return made[0], made[1]


def queries(client, url: str, data=None, *, htmx: bool = False, method: str = "get") -> int:
    extra = {"HTTP_HX_REQUEST": "true"} if htmx else {}
    with CaptureQueriesContext(connection) as ctx:
        response = getattr(client, method)(url, data or {}, **extra)
        if response.streaming:
            b"".join(response.streaming_content)
    assert response.status_code in (200, 302), (url, response.status_code)
    return len(ctx.captured_queries)


def listing_pages(
    dataset: Dataset, v1: DatasetVersion, v2: DatasetVersion
) -> list[tuple[str, str, dict, bool]]:
    pk = dataset.pk
    examples = reverse("datasets:examples", args=[pk])
    pii = reverse("datasets:pii", args=[pk])
    duplicates_url = reverse("datasets:duplicates", args=[pk])
    return [
        ("dataset list", reverse("datasets:list"), {}, False),
        ("dataset page", reverse("datasets:detail", args=[pk]), {}, False),
        ("scan status", reverse("datasets:scan_status", args=[pk]), {}, True),
        ("examples", examples, {}, False),
        ("examples rows", examples, {}, True),
        ("examples last page", examples, {"page": 10**6}, True),
        ("examples by tag", examples, {"tag": "t3"}, True),
        ("examples by split", examples, {"split": "eval"}, True),
        ("examples with findings", examples, {"state": "findings"}, True),
        ("examples in a group", examples, {"state": "duplicate"}, True),
        ("examples, all", examples, {"state": "all"}, True),
        ("examples search", examples, {"q": "PARCEL"}, True),
        (
            "example",
            reverse("datasets:example", args=[dataset.examples.order_by("position")[0].pk]),
            {},
            False,
        ),
        ("duplicates", duplicates_url, {}, False),
        ("duplicates, all", duplicates_url, {"show": "all"}, False),
        ("findings", pii, {}, False),
        ("findings rows", pii, {}, True),
        ("findings by type", pii, {"decision": "pending", "type": "PERSON"}, False),
        ("findings scrubbed", pii, {"decision": "redact"}, True),
        ("version", reverse("datasets:version", args=[v2.pk]), {}, False),
        (
            "version estimate",
            reverse("datasets:version", args=[v2.pk]),
            {"epochs": 1, "batch_size": 4, "grad_accum": 1, "max_length": 512},
            False,
        ),
        ("diff", reverse("datasets:version_diff", args=[v2.pk, v1.pk]), {}, False),
        ("export", reverse("datasets:version_export", args=[v2.pk]), {}, False),
    ]


def test_listing_pages_run_as_many_queries_for_few_rows_as_for_many(curator, client_for):
    client = client_for(curator)
    counts = {}
    for n in (SMALL, LARGE):
        dataset = build(f"scale-{n}", n, curator)
        v1, v2 = frozen_pair(dataset, curator)
        counts[n] = {
            name: queries(client, url, data, htmx=htmx)
            for name, url, data, htmx in listing_pages(dataset, v1, v2)
        }
    grown = {name: (counts[SMALL][name], counts[LARGE][name]) for name in counts[SMALL]}
    assert {k: v for k, v in grown.items() if v[0] != v[1]} == {}, grown


def test_dataset_list_counts_each_dataset_without_joining_examples_and_versions(curator, client_for):
    client = client_for(curator)
    small = build("few", 3, curator, findings=False)
    frozen_pair(small, curator)
    large = build("many", 40, curator, findings=False)
    Example.objects.filter(dataset=large, position__lt=4).update(dropped=True)
    versions_ = frozen_pair(large, curator)
    DatasetVersion.objects.create(dataset=large, number=3, kind="sft", sha256="0" * 64)
    response = client.get(reverse("datasets:list"))
    rows = {d.name: (d.n_examples, d.n_versions) for d in response.context["datasets"]}
    assert rows == {"few": (3, 2), "many": (36, len(versions_) + 1)}
    empty = datasets.create_dataset("empty", "sft", curator)
    rows = {
        d.name: (d.n_examples, d.n_versions) for d in client.get(reverse("datasets:list")).context["datasets"]
    }
    assert rows[empty.name] == (0, 0)
    with CaptureQueriesContext(connection) as few:
        client.get(reverse("datasets:list"))
    # counted in a subquery each: a join of both tables counts examples x versions rows
    assert not [q for q in few.captured_queries if 'JOIN "datasets_app_example"' in q["sql"]]
    for i in range(5):
        build(f"more-{i}", 2, curator, findings=False)
    with CaptureQueriesContext(connection) as more:
        client.get(reverse("datasets:list"))
    assert len(more.captured_queries) == len(few.captured_queries)


def test_dataset_page_counts_match_the_examples(curator, client_for):
    dataset = build("overview", 30, curator)
    Example.objects.filter(dataset=dataset, position__in=[0, 1, 2]).update(dropped=True)
    Example.objects.filter(dataset=dataset, position=3).update(pii_status=Example.Pii.UNSCANNED)
    overview = client_for(curator).get(reverse("datasets:detail", args=[dataset.pk])).context["overview"]
    active = Example.objects.filter(dataset=dataset, dropped=False)
    assert overview["total"] == 27 and overview["dropped"] == 3 and overview["unscanned"] == 1
    assert overview["splits"] == {s: active.filter(split=s).count() for s in ("train", "eval", "golden")}
    assert overview["pii"] == {"unscanned": 1, "pending": 26}  # only the statuses present
    assert overview["stats"]["count"] == 27
    assert any("1 examples have not been scanned" in b for b in overview["blockers"])


def test_tag_menu_is_the_most_common_tags_and_only_on_the_whole_page(curator, client_for):
    dataset = build("tags", 30, curator, findings=False)
    Example.objects.filter(dataset=dataset, position=0).update(tags=["rare", "x|y", "é"], tags_text="")
    client = client_for(curator)
    url = reverse("datasets:examples", args=[dataset.pk])
    all_tags = client.get(url).context["all_tags"]
    assert all_tags[0] == "common" and set(all_tags) == {"common", "rare", "x|y", "é"} | {
        f"t{i}" for i in range(7)
    }
    assert client.get(url, HTTP_HX_REQUEST="true").context["all_tags"] == []


def test_export_streams_in_blocks_with_the_bytes_of_every_line(curator, client_for):
    dataset = build("export", 800, curator, findings=False)  # about 160 kB
    version = versions.freeze(dataset, curator, "all")
    response = client_for(curator).get(reverse("datasets:version_export", args=[version.pk]))
    assert isinstance(response, StreamingHttpResponse)
    chunks = list(response.streaming_content)
    body = b"".join(chunks)
    assert body == b"".join(versions.export_lines(version))
    assert len(body.splitlines()) == 800 and 1 < len(chunks) < 10
    assert hashlib.sha256(body).hexdigest() == response["X-Content-SHA256"]


def test_rejected_lines_download_streams(curator, client_for, tmp_path):
    from datasets_app.services import imports

    dataset = datasets.create_dataset("rejects", "sft", curator)
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"messages": _messages(1)}) + "\n" + "not json\n" * 50, encoding="utf-8")
    upload = imports.receive_path(dataset, curator, path)
    imports.process(upload.pk)
    response = client_for(curator).get(reverse("datasets:upload_rejects", args=[upload.pk]))
    assert isinstance(response, StreamingHttpResponse)
    assert b"".join(response.streaming_content).count(b"not json") == 50


def _freeze_queries(n: int, user) -> tuple[int, DatasetVersion]:
    dataset = build(f"freeze-{n}", n, user, findings=False)
    with CaptureQueriesContext(connection) as ctx:
        version = versions.freeze(dataset, user, "x")
    return len(ctx.captured_queries), version


def test_freeze_writes_rows_in_batches_and_copies_them_exactly(curator):
    few, _ = _freeze_queries(20, curator)
    many, version = _freeze_queries(600, curator)
    assert many == few  # one batch of rows each (no INSERT per hundred rows)
    rows = list(version.examples.order_by("position"))
    source = list(Example.objects.filter(dataset=version.dataset).order_by("position"))
    assert [(r.example_id, r.position) for r in rows] == [(e.pk, i) for i, e in enumerate(source)]
    for row, ex in zip(rows, source, strict=True):
        assert (row.messages, row.tags, row.split, row.token_count) == (
            ex.messages,
            ex.tags,
            ex.split,
            ex.token_count,
        )
        body = versions.canonical_record(ex.messages, ex.chosen, ex.rejected, ex.tags, ex.split)
        assert row.digest == versions.record_digest(body)
    canonical = hashlib.sha256()
    for ex in source:
        body = versions.canonical_record(ex.messages, ex.chosen, ex.rejected, ex.tags, ex.split)
        canonical.update(
            json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        )
    assert version.sha256 == canonical.hexdigest()
    assert version.counts["examples"] == 600 and version.token_stats["count"] == 600
    assert (
        version.counts[versions.EXPORT_SHA256]
        == hashlib.sha256(b"".join(versions.export_lines(version))).hexdigest()
    )


def _decide_all_queries(n_groups: int, user, *, findings: bool) -> tuple[int, Dataset]:
    dataset = build(f"groups-{n_groups}-{findings}", 2 * n_groups, user, findings=findings)
    with CaptureQueriesContext(connection) as ctx:
        assert duplicates.decide_all(dataset, "keep_one", user) == n_groups
    return len(ctx.captured_queries), dataset


def test_deciding_every_group_runs_a_few_queries_per_group_and_decides_each_as_one_would(curator):
    few, _ = _decide_all_queries(5, curator, findings=False)
    many, _ = _decide_all_queries(45, curator, findings=False)
    # an audit event per group (its savepoint, the chain's last hash, the insert, the release, and on
    # PostgreSQL the chain's lock), nothing else
    assert (many - few) / 40 <= 5, (few, many)
    _, dataset = _decide_all_queries(10, curator, findings=True)
    assert not DuplicateGroup.objects.filter(dataset=dataset).exclude(decision="keep_one").exists()
    for group in DuplicateGroup.objects.filter(dataset=dataset):
        first, second = group.members.order_by("position")
        assert not first.dropped and second.dropped
        event = AuditEvent.objects.get(verb="duplicates.keep_one", data__group=group.pk)
        assert event.data == {"group": group.pk, "members": 2, "dropped": [second.pk], "restored": []}
        # the dropped copy keeps no raw personal data: its finding was applied without review
        assert not second.findings.filter(decision=PiiFinding.Decision.PENDING).exists()
    # keep all restores every member, as one decision per group does
    assert duplicates.decide_all(dataset, "keep_all", curator) == 0  # none pending any more
    group = DuplicateGroup.objects.filter(dataset=dataset).first()
    duplicates.decide(group, "keep_all", curator)
    assert not group.members.filter(dropped=True).exists()


def test_keep_one_keeps_the_first_member_not_dropped(curator):
    dataset = build("first-active", 6, curator, findings=False)
    group = DuplicateGroup.objects.filter(dataset=dataset).order_by("id").first()
    first, second = group.members.order_by("position")
    Example.objects.filter(pk=first.pk).update(dropped=True)
    duplicates.decide_all(dataset, "keep_one", curator)
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.dropped and not second.dropped
    event = AuditEvent.objects.get(verb="duplicates.keep_one", data__group=group.pk)
    assert event.data["dropped"] == [] and event.data["restored"] == []


def test_split_by_ratio_writes_only_the_rows_that_move(curator, monkeypatch):
    dataset = build("split", 90, curator, findings=False)
    counts = versions.split_by_ratio(dataset, 80, 10, 10, 7, curator)
    before = dict(Example.objects.filter(dataset=dataset).values_list("pk", "split"))
    assert list(before.values()).count("eval") == counts["eval"] == 9
    written = []
    update = QuerySet.update

    def counting_update(self, **kwargs):
        written.append(update(self, **kwargs))
        return written[-1]

    monkeypatch.setattr(QuerySet, "update", counting_update)
    with CaptureQueriesContext(connection) as ctx:
        assert versions.split_by_ratio(dataset, 80, 10, 10, 7, curator) == counts  # the same seed: no move
    assert dict(Example.objects.filter(dataset=dataset).values_list("pk", "split")) == before
    assert written == [0, 0, 0]  # one UPDATE per split, each matching no row
    assert len(ctx.captured_queries) <= 12  # however many rows: 5,000 ids per UPDATE
    assert versions.split_by_ratio(dataset, 50, 50, 0, 8, curator) == {"eval": 45, "golden": 0, "train": 45}
    moved = sum(
        1
        for pk, split in Example.objects.filter(dataset=dataset).values_list("pk", "split")
        if before[pk] != split
    )
    assert sum(written[3:]) == moved
