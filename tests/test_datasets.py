"""Dataset curation through the services, the web views and the commands (no worker process here;
see test_integration_worker.py for the same flow through a real Celery worker)."""

from __future__ import annotations

import json
import random
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connection
from django.urls import reverse

from datasets_app import parsing, search
from datasets_app.dedup import content_hash
from datasets_app.models import Dataset, DatasetVersion, DuplicateGroup, Example, PiiFinding, Upload
from datasets_app.services import datasets, duplicates, imports, scrub, storage, versions
from studio.models import AuditEvent

pytestmark = pytest.mark.django_db

GOOD = [
    {
        "messages": [
            {"role": "user", "content": "Hi, I am Maria Gonzalez. Order ORD-449812 is late."},
            {"role": "assistant", "content": "Sorry Maria Gonzalez, I will check ORD-449812 now."},
        ],
        "tags": ["shipping"],
    },
    {
        "messages": [
            {"role": "user", "content": "Please email me at maria.gonzalez@example.com about SKU-AB-1234."},
            {"role": "assistant", "content": "Done, I wrote to maria.gonzalez@example.com."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        "tags": ["math"],
    },
]


def write_jsonl(path: Path, rows: list, extra_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def import_file(dataset: Dataset, path: Path, user=None):
    upload = imports.receive_path(dataset, user, path)
    return imports.process(upload.pk)


@pytest.fixture
def dataset(curator):
    return datasets.create_dataset("Support", "sft", curator)


def test_import_reports_bad_lines_and_keeps_good_ones(dataset, curator, tmp_path):
    path = write_jsonl(
        tmp_path / "f.jsonl", GOOD, ['{"messages": [{"role": "user", "content": "x"}]}', "not json"]
    )
    result = import_file(dataset, path, curator)
    assert result.imported == 3 and result.rejected == 2
    upload = Upload.objects.get()
    assert upload.status == Upload.Status.IMPORTED
    assert [(r["line"], r["code"]) for r in upload.report["first"]] == [
        (4, "no_assistant"),
        (5, "invalid_json"),
    ]
    assert upload.report["counts"] == {"no_assistant": 1, "invalid_json": 1}
    assert list(dataset.examples.values_list("source_line", flat=True)) == [1, 2, 3]
    # rejected lines downloadable (decrypted), never stored in clear
    rejects = b"".join(storage.decrypt_chunks(Path(upload.rejects_path)))
    assert rejects.splitlines() == [b'{"messages": [{"role": "user", "content": "x"}]}', b"not json"]
    assert b"not json" not in Path(upload.rejects_path).read_bytes()
    # the original is encrypted at rest, the plaintext copy gone
    assert not upload.raw_path
    original = b"".join(storage.decrypt_chunks(Path(upload.stored_path)))
    assert original == path.read_bytes()
    assert b"Maria" not in Path(upload.stored_path).read_bytes()
    assert AuditEvent.objects.filter(verb="dataset.import").count() == 1


def test_file_with_no_good_line_creates_nothing(dataset, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [], ["{", '{"messages": []}'])
    result = import_file(dataset, path)
    assert result.imported == 0
    upload = Upload.objects.get()
    assert upload.status == Upload.Status.REJECTED
    assert "nothing was added" in upload.error
    assert Example.objects.count() == 0
    assert Dataset.objects.get(pk=dataset.pk).next_position == 0


def test_failure_midway_leaves_nothing_half_imported(dataset, tmp_path, monkeypatch, settings):
    settings.STUDIO_IMPORT_BATCH = 1
    path = write_jsonl(tmp_path / "f.jsonl", GOOD)
    calls = {"n": 0}
    real = imports._insert_examples  # the batch insert (executemany / COPY)

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(imports, "_insert_examples", flaky)
    with pytest.raises(OSError):
        import_file(dataset, path)
    assert calls["n"] == 2  # the first batch was written, then rolled back
    assert Example.objects.count() == 0
    upload = Upload.objects.get()
    assert upload.status == Upload.Status.FAILED
    assert "nothing was added" in upload.error


def test_database_error_in_a_batch_rolls_back_the_whole_import(dataset, tmp_path, settings):
    """A failing INSERT/COPY (here: a position already taken) leaves nothing half imported."""
    settings.STUDIO_IMPORT_BATCH = 2
    Example.objects.create(dataset=dataset, position=2, messages=GOOD[0]["messages"], content_hash="x")
    path = write_jsonl(tmp_path / "f.jsonl", GOOD)
    with pytest.raises(IntegrityError):
        import_file(dataset, path)
    assert list(Example.objects.values_list("position", flat=True)) == [2]
    assert Upload.objects.get().status == Upload.Status.FAILED
    assert Dataset.objects.get(pk=dataset.pk).next_position == 0


COLUMNS = (
    "position, source_line, messages, chosen, rejected, tags, tags_text, split, content_hash, "
    "minhash, token_count, pii_status, dropped, duplicate_group_id, edited, kept_digests"
)


JSON_COLUMNS = (2, 5, 15)  # messages, tags, kept_digests


def _stored_rows(dataset: Dataset) -> list[tuple]:
    """The examples' columns as the database holds them, JSON columns decoded (the import writes
    orjson's compact text where bulk_create writes json.dumps text: the same JSON)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {COLUMNS} FROM datasets_app_example WHERE dataset_id = %s ORDER BY position",  # noqa: S608
            [dataset.pk],
        )
        rows = cursor.fetchall()
    return [
        tuple(json.loads(v) if i in JSON_COLUMNS and isinstance(v, str) else v for i, v in enumerate(row))
        for row in rows
    ]


def _bulk_create_reference(dataset: Dataset, upload: Upload, path: Path) -> None:
    """What the import wrote before the fast path: model instances through bulk_create."""
    records = [r for r in parsing.parse_file(path, kind=dataset.kind) if isinstance(r, parsing.Record)]
    Example.objects.bulk_create(
        Example(
            dataset=dataset,
            upload=upload,
            position=i,
            source_line=rec.line,
            messages=rec.messages,
            chosen=rec.chosen,
            rejected=rec.rejected,
            tags=rec.tags,
            tags_text=imports.tags_text(rec.tags),
            content_hash="",  # left to the duplicate analysis that follows an import
            token_count=0,
        )
        for i, rec in enumerate(records)
    )


FAST_PATH_FILES = {
    "openai.jsonl": (
        "sft",
        "\n".join(
            [json.dumps(r) for r in GOOD]
            + [
                json.dumps(
                    {
                        "messages": [
                            {"role": "system", "content": "Réponds en français, s'il te plaît."},
                            {"role": "user", "content": '  Où est ma commande ?\tORD-1 😀 "quoted" \\ '},
                            {"role": "assistant", "content": "Elle arrive demain.\nMerci !"},
                        ],
                        "tags": [" billing ", "billing", "Überweisung", ""],
                    },
                    ensure_ascii=False,
                ),
                '{"messages": [{"role": "User", "content": "Hi"}, {"role": "ASSISTANT", "content": "Hello"}]}',
                '{"messages": [{"role": "user", "content": "x"}]}',
                "not json",
                json.dumps({"messages": GOOD[0]["messages"], "tags": ["a" * 600, "b" * 600]}),
            ]
        ),
    ),
    "pairs.jsonl": (
        "preference",
        "\n".join(
            json.dumps(r, ensure_ascii=False)
            for r in [
                {"prompt": "Which is better? ünïcödé", "chosen": "This one.", "rejected": "That one."},
                {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away"},
            ]
        ),
    ),
    "qa.csv": (
        "sft",
        'question,answer,tags\nWhere is my parcel?,"On its way, today.","shipping; b"\nAnd the bill?,Sent.,\n',
    ),
}


@pytest.mark.parametrize("name", sorted(FAST_PATH_FILES))
def test_import_writes_the_same_rows_as_bulk_create(curator, tmp_path, name):
    """The batch insert (executemany on SQLite, COPY on PostgreSQL) stores exactly what
    Example.objects.bulk_create stored for the same file: same columns, same JSON values."""
    kind, text = FAST_PATH_FILES[name]
    path = tmp_path / name
    path.write_text(text + "\n", encoding="utf-8")
    fast = datasets.create_dataset("fast", kind, curator)
    result = import_file(fast, path, curator)
    assert result.imported >= 2
    reference = datasets.create_dataset("reference", kind, curator)
    _bulk_create_reference(reference, result.upload, path)
    assert _stored_rows(fast) == _stored_rows(reference)
    duplicates.recompute(fast)
    assert [ex.content_hash for ex in fast.examples.all()] == [
        content_hash(r.messages, r.chosen, r.rejected)
        for r in parsing.parse_file(path, kind=kind)
        if isinstance(r, parsing.Record)
    ]
    examples = list(fast.examples.all())
    assert {ex.upload_id for ex in examples} == {result.upload.pk}
    assert all(ex.created_at and ex.updated_at for ex in examples)
    assert Dataset.objects.get(pk=fast.pk).next_position == len(examples) == result.imported
    assert [ex.messages for ex in examples] == [
        r.messages for r in parsing.parse_file(path, kind=kind) if isinstance(r, parsing.Record)
    ]


def test_upload_size_limit(dataset, settings):
    settings.STUDIO_UPLOAD_MAX_BYTES = 10
    with pytest.raises(imports.ImportRefused, match="larger than the upload limit"):
        imports.receive_upload(dataset, None, "big.jsonl", [b"x" * 6, b"y" * 6])
    assert Upload.objects.count() == 0
    assert not list((Path(settings.DATA_DIR) / "uploads" / "incoming").glob("*"))


def scanned(dataset, tmp_path, rows=GOOD):
    import_file(dataset, write_jsonl(tmp_path / "f.jsonl", rows))
    scrub.scan_examples(dataset)
    return dataset


def test_scan_finds_pii_and_keeps_business_ids(dataset, tmp_path):
    scanned(dataset, tmp_path)
    types = set(PiiFinding.objects.values_list("entity_type", flat=True))
    assert {"PERSON", "EMAIL_ADDRESS"} <= types
    values = {
        scrub.finding_context(f, f.example)["value"] for f in PiiFinding.objects.select_related("example")
    }
    assert "ORD-449812" not in values and "SKU-AB-1234" not in values
    assert Example.objects.filter(pii_status=Example.Pii.PENDING).count() == 2
    assert Example.objects.filter(pii_status=Example.Pii.CLEAN).count() == 1


def test_accepting_findings_scrubs_with_consistent_pseudonyms(dataset, curator, tmp_path):
    scanned(dataset, tmp_path)
    n = scrub.apply_all(dataset, curator)
    assert n >= 4
    first, second, _ = Example.objects.order_by("position")
    text1 = " ".join(m["content"] for m in first.messages)
    text2 = " ".join(m["content"] for m in second.messages)
    assert "Maria" not in text1 + text2 and "maria.gonzalez@example.com" not in text2
    assert text1.count("<PERSON_1>") == 2
    assert text2.count("<EMAIL_ADDRESS_1>") == 2
    assert "ORD-449812" in text1 and "SKU-AB-1234" in text2
    assert not PiiFinding.objects.filter(decision="pending").exists()
    assert "maria" not in json.dumps(Dataset.objects.get(pk=dataset.pk).pseudonym_map).lower()
    # search finds the pseudonym, not the name
    assert not search.search(Example.objects.all(), "maria").exists()
    assert search.search(Example.objects.all(), "<person_1>").exists()


def test_rejecting_keeps_text_and_survives_rescan(dataset, curator, tmp_path):
    scanned(dataset, tmp_path)
    person = PiiFinding.objects.filter(entity_type="PERSON").order_by("pk")
    ids = list(person.values_list("pk", flat=True))
    scrub.decide(dataset, ids, False, curator)
    first = Example.objects.order_by("position").first()
    assert "Maria Gonzalez" in first.messages[0]["content"]
    scrub.scan_examples(dataset)  # re-scan: kept values are not flagged again
    assert not PiiFinding.objects.filter(entity_type="PERSON", decision="pending").exists()


def test_offsets_shift_after_partial_redaction(dataset, curator, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Mail john.smith@example.com or call 415-555-0199 today."},
                {"role": "assistant", "content": "Noted."},
            ]
        }
    ]
    scanned(dataset, tmp_path, rows)
    email = PiiFinding.objects.get(entity_type="EMAIL_ADDRESS")
    scrub.decide(dataset, [email.pk], True, curator)
    phone = PiiFinding.objects.get(entity_type="PHONE_NUMBER")
    ex = Example.objects.get()
    assert ex.segments()[phone.segment][phone.start : phone.end] == "415-555-0199"
    scrub.decide(dataset, [phone.pk], True, curator)
    ex.refresh_from_db()
    assert ex.messages[0]["content"] == "Mail <EMAIL_ADDRESS_1> or call <PHONE_NUMBER_1> today."


def test_curator_marks_a_missed_span(dataset, curator, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "My badge says Q-Zebulon, can you reset it?"},
                {"role": "assistant", "content": "Yes."},
            ]
        }
    ]
    scanned(dataset, tmp_path, rows)
    ex = Example.objects.get()
    start = ex.messages[0]["content"].index("Q-Zebulon")
    finding = scrub.mark_span(ex, 0, start, start + len("Q-Zebulon"), "PERSON", curator)
    ex.refresh_from_db()
    assert "Q-Zebulon" not in ex.messages[0]["content"]
    assert finding.source == "curator" and finding.decision == "redact"
    with pytest.raises(scrub.ScrubError, match="Select the words"):
        scrub.mark_span(ex, 0, 5, 5, "PERSON", curator)


def test_bulk_decision_per_type(dataset, curator, tmp_path):
    scanned(dataset, tmp_path)
    n = scrub.decide_type(dataset, "EMAIL_ADDRESS", True, curator)
    assert n == 2
    assert not PiiFinding.objects.filter(entity_type="EMAIL_ADDRESS", decision="pending").exists()
    assert PiiFinding.objects.filter(entity_type="PERSON", decision="pending").exists()
    assert AuditEvent.objects.filter(verb="pii.accept_type").exists()


def test_custom_recognizer_and_keep_pattern_from_policy(curator, tmp_path):
    from datasets_app.pii import CustomRecognizer, PiiPolicy

    policy = PiiPolicy(
        custom_recognizers=[CustomRecognizer(name="emp", entity_type="EMPLOYEE_ID", regex=r"EMP-\d{6}")],
        keep_patterns=[r"\bZX-\d{4}\b"],
    )
    ds = datasets.create_dataset("Custom", "sft", curator, policy=policy)
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Employee EMP-123456 asks about part ZX-9911."},
                {"role": "assistant", "content": "OK."},
            ]
        }
    ]
    scanned(ds, tmp_path, rows)
    types = list(PiiFinding.objects.values_list("entity_type", flat=True))
    assert "EMPLOYEE_ID" in types
    values = [
        scrub.finding_context(f, f.example)["value"] for f in PiiFinding.objects.select_related("example")
    ]
    assert "ZX-9911" not in values


def test_edit_rescans_and_validates(
    dataset, curator, tmp_path, django_capture_on_commit_callbacks, monkeypatch
):
    from datasets_app import tasks

    queued = []
    monkeypatch.setattr(tasks.scan_examples, "delay", lambda *args: queued.append(args))
    scanned(dataset, tmp_path)
    ex = Example.objects.order_by("position").first()
    with pytest.raises(datasets.EditRefused, match="role"):
        datasets.edit_example(ex, messages=[{"role": "robot", "content": "x"}], user=curator)
    new = [
        {"role": "user", "content": "Call me at 212-555-0142 please"},
        {"role": "assistant", "content": "Sure."},
    ]
    with django_capture_on_commit_callbacks(execute=True):
        datasets.edit_example(ex, messages=new, tags=["phone"], user=curator)
    assert queued == [(dataset.pk, [ex.pk])]  # the re-scan is queued once the edit commits
    ex.refresh_from_db()
    assert ex.pii_status == Example.Pii.UNSCANNED and not ex.findings.exists()
    scrub.scan_examples(dataset, [ex.pk])
    assert ex.findings.filter(entity_type="PHONE_NUMBER").exists()


def test_duplicates_exact_and_near_and_decisions(dataset, curator, tmp_path):
    long = (
        "My router keeps dropping the connection every evening around eight and I have restarted it twice "
        "already. The lights on the front stay green the whole time, the cable to the wall socket is new, and "
        "my neighbours on the same street do not see the problem at all. What else can I try before you send "
        "a technician to the house next week?"
    )
    rows = [
        {
            "messages": [
                {"role": "user", "content": long},
                {"role": "assistant", "content": "Let us check the line."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": long.upper() + "  "},
                {"role": "assistant", "content": "Let us check the line."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": long.replace("twice", "three times")},
                {"role": "assistant", "content": "Let us check the line."},
            ]
        },
        GOOD[2],
    ]
    import_file(dataset, write_jsonl(tmp_path / "d.jsonl", rows))
    n = duplicates.recompute(dataset)
    assert n >= 1
    groups = list(DuplicateGroup.objects.all())
    members = sorted(len(g.members.all()) for g in groups)
    assert sum(members) == 3
    duplicates.decide_all(dataset, DuplicateGroup.Decision.KEEP_ONE, curator)
    assert Example.objects.filter(dropped=False).count() == 4 - (3 - len(groups))
    group = groups[0]
    duplicates.decide(group, DuplicateGroup.Decision.KEEP_ALL, curator)
    assert not group.members.filter(dropped=True).exists()


def test_freeze_blocked_until_reviewed_then_immutable(dataset, curator, tmp_path):
    scanned(dataset, tmp_path)
    with pytest.raises(versions.FreezeRefused, match="still to review"):
        versions.freeze(dataset, curator)
    scrub.apply_all(dataset, curator)
    v1 = versions.freeze(dataset, curator, "first")
    assert v1.number == 1 and len(v1.sha256) == 64
    assert v1.counts["examples"] == 3 and v1.counts["tags"] == {"shipping": 1, "math": 1}
    with pytest.raises(PermissionError):
        v1.save()
    # the same content again is not a new version (a second click, or nothing changed): refused, naming v1
    with pytest.raises(versions.NothingChanged, match="Nothing changed since version 1") as same:
        versions.freeze(dataset, curator, "no change")
    assert same.value.version == v1 and dataset.versions.count() == 1
    v2 = v1
    # an edit changes the hash and shows in the diff
    ex = Example.objects.order_by("position").last()
    datasets.edit_example(ex, messages=ex.messages, tags=["math", "easy"], user=curator)
    Example.objects.filter(dataset=dataset).update(dropped=False)
    with pytest.raises(versions.FreezeRefused, match="not been scanned"):  # new tags are scanned first
        versions.freeze(dataset, curator)
    scrub.scan_examples(dataset, [ex.pk])
    v3 = versions.freeze(dataset, curator)
    assert v3.number == 2 and v3.sha256 != v2.sha256
    assert versions.diff(v2, v3).summary() == {"added": 0, "removed": 0, "changed": 1}


def test_split_by_ratio_is_seeded(dataset, curator, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(50)
    ]
    import_file(dataset, write_jsonl(tmp_path / "s.jsonl", rows))
    counts = versions.split_by_ratio(dataset, 80, 10, 10, 7, curator)
    assert counts == {"eval": 5, "golden": 5, "train": 40}
    first = list(Example.objects.order_by("position").values_list("split", flat=True))
    versions.split_by_ratio(dataset, 80, 10, 10, 7, curator)
    assert list(Example.objects.order_by("position").values_list("split", flat=True)) == first


def test_import_and_export_commands(tmp_path, roles):
    path = write_jsonl(tmp_path / "in.jsonl", GOOD, ["{bad"])
    out = StringIO()
    call_command(
        "import_dataset",
        str(path),
        "--name",
        "CLI set",
        "--scrub",
        "--freeze",
        "--keep-pattern",
        r"SKU-[A-Z]{2}-\d{4}",
        stdout=out,
        stderr=StringIO(),
    )
    lines = out.getvalue().strip().splitlines()
    assert lines[0].startswith("line 4: ")
    version = DatasetVersion.objects.get(pk=int(lines[-1]))
    export = tmp_path / "out.jsonl"
    call_command(
        "export_dataset", str(version.pk), "--out", str(export), stdout=StringIO(), stderr=StringIO()
    )
    rows = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(rows) == 3
    assert rows[2]["messages"] == GOOD[2]["messages"]
    assert "Maria" not in export.read_text() and "SKU-AB-1234" in export.read_text()


def test_import_command_with_nothing_good_creates_nothing(tmp_path, roles):
    path = write_jsonl(tmp_path / "bad.jsonl", [], ['{"messages": "nope"}', "[1, 2"])
    out = StringIO()
    with pytest.raises(CommandError):
        call_command("import_dataset", str(path), "--name", "Nothing", stdout=out, stderr=StringIO())
    assert "line 1: " in out.getvalue() and "line 2: " in out.getvalue()
    assert not Dataset.objects.filter(name="Nothing").exists()
    assert Upload.objects.count() == 0 and Example.objects.count() == 0


def test_views_render_content_escaped(dataset, curator, client_for, tmp_path):
    payload = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    rows = [
        {
            "messages": [{"role": "user", "content": payload}, {"role": "assistant", "content": "ok"}],
            "tags": ["<b>tag</b>"],
        }
    ]
    import_file(dataset, write_jsonl(tmp_path / "x.jsonl", rows))
    ex = Example.objects.get()
    client = client_for(curator)
    for url in (reverse("datasets:examples", args=[dataset.pk]), reverse("datasets:example", args=[ex.pk])):
        html = client.get(url).content.decode()
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>tag</b>" not in html
        assert "&lt;script&gt;alert" in html


def test_token_counts_without_a_base_model_say_so_instead_of_zero(dataset, curator, client_for, tmp_path):
    """No tokenizer, no count: the pages say why there is no figure rather than showing "0 tokens"."""
    assert dataset.base_model is None
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    import_file(dataset, write_jsonl(tmp_path / "x.jsonl", rows))
    client = client_for(curator)
    detail = client.get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    assert "choose a base model</a> to count them" in detail
    assert reverse("datasets:settings", args=[dataset.pk]) in detail
    example = client.get(reverse("datasets:example", args=[Example.objects.get().pk])).content.decode()
    assert "tokens not counted (no base model)" in example and " 0 tokens" not in example


def test_search_matches_message_text_case_insensitively(dataset, curator, client_for, tmp_path):
    """Search reads the stored messages (and chosen/rejected): any case, non-ASCII too, never the JSON keys."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Wo ist die ÜBERWEISUNG?"},
                {"role": "assistant", "content": "Unterwegs."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": 'He said "hi"\nthen left'},
                {"role": "assistant", "content": "OK"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Refund 50%_now"},
                {"role": "assistant", "content": "Done"},
            ]
        },
    ]
    import_file(dataset, write_jsonl(tmp_path / "s.jsonl", rows))
    Example.objects.create(
        dataset=dataset, position=99, messages=[{"role": "user", "content": "Café?"}], content_hash="x"
    )

    def found(q: str) -> list[int]:
        return sorted(search.search(dataset.examples.all(), q).values_list("position", flat=True))

    assert found("überweisung") == found("ÜberWeisung") == [0]
    assert found("café") == found("CAFÉ") == [99]  # stored by the ORM as json.dumps text (\u00e9)
    assert found('"hi"\nthen') == [1]  # quotes and newlines as written, not as JSON escapes
    assert found("50%_") == [2] and found("%") == [2]
    assert found("unterwegs.") == [0] and found("?\nunterwegs") == [0]  # segments joined by newlines
    assert found("role") == found("content") == found("assistant") == []
    preference = datasets.create_dataset("Pairs", "preference", curator)
    Example.objects.create(
        dataset=preference,
        position=0,
        messages=[{"role": "user", "content": "Which?"}],
        chosen="This ONE",
        rejected="That one",
        content_hash="y",
    )
    assert search.search(preference.examples.all(), "this one").count() == 1
    assert search.search(preference.examples.all(), "that one").count() == 1
    html = client_for(curator).get(reverse("datasets:examples", args=[dataset.pk]), {"q": "überweisung"})
    assert "Unterwegs." in html.content.decode() and "Refund" not in html.content.decode()


def test_sqlite_search_function_matches_the_joined_lowercased_text():
    """The SQLite search function (with its shortcut for rows it need not parse) agrees with the
    definition on random texts, whether the JSON was written by the import or by the ORM."""
    rng = random.Random(3)
    alphabet = ["a", "b", "K", "k", "\u212a", "É", "é", " ", "\n", '"', "\\", "?", "İ", "i"]
    for _ in range(3000):
        turns = [
            {"role": "user", "content": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))}
            for _ in range(rng.randint(0, 3))
        ]
        chosen = rng.choice([None, "".join(rng.choice(alphabet) for _ in range(3))])
        rejected = None if chosen is None else "".join(rng.choice(alphabet) for _ in range(3))
        needle = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))).lower()
        texts = [t["content"] for t in turns] + [t for t in (chosen, rejected) if t is not None]
        expected = needle in "\n".join(texts).lower()
        for stored in (imports.json_text(turns), json.dumps(turns)):
            assert search._sqlite_text_contains(stored, chosen, rejected, needle) == expected


def test_web_upload_review_and_freeze(
    curator, client_for, tmp_path, django_capture_on_commit_callbacks, settings
):
    client = client_for(curator)
    response = client.post(reverse("datasets:create"), {"name": "Web set", "kind": "sft", "description": ""})
    assert response.status_code == 302
    dataset = Dataset.objects.get(name="Web set")
    path = write_jsonl(tmp_path / "w.jsonl", GOOD)
    with django_capture_on_commit_callbacks(execute=False) as callbacks, open(path, "rb") as fh:
        response = client.post(reverse("datasets:upload_new", args=[dataset.pk]), {"file": fh, "format": ""})
    upload = Upload.objects.get()
    assert response.status_code == 302 and response["Location"] == upload.get_absolute_url()
    assert len(callbacks) == 1  # process_upload queued
    assert "Waiting for a worker" in client.get(upload.get_absolute_url()).content.decode()
    imports.process(upload.pk)
    scrub.scan_examples(dataset)
    page = client.get(reverse("datasets:pii", args=[dataset.pk])).content.decode()
    assert "EMAIL_ADDRESS" in page
    finding = PiiFinding.objects.filter(entity_type="EMAIL_ADDRESS").first()
    response = client.post(
        reverse("datasets:pii_decide", args=[dataset.pk]),
        {"finding": finding.pk, "action": "accept"},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200 and "Scrubbed" in response.content.decode()
    for t in scrub.pending_types(dataset):
        client.post(reverse("datasets:pii_decide_type", args=[dataset.pk]), {"type": t, "action": "accept"})
    response = client.post(reverse("datasets:freeze", args=[dataset.pk]), {"changelog": "web"})
    version = DatasetVersion.objects.get()
    assert response.status_code == 302 and response["Location"] == version.get_absolute_url()
    body = b"".join(client.get(reverse("datasets:version_export", args=[version.pk])).streaming_content)
    assert b"maria.gonzalez@example.com" not in body and len(body.splitlines()) == 3
    assert (
        client.get(
            version.get_absolute_url() + "?epochs=2&batch_size=1&grad_accum=1&max_length=64"
        ).status_code
        == 200
    )


def test_csv_upload_asks_for_columns(curator, client_for, tmp_path):
    client = client_for(curator)
    dataset = datasets.create_dataset("CSV set", "sft", curator)
    path = tmp_path / "c.csv"
    path.write_text("question,answer,topic\nWhere is my order?,It ships today.,shipping\n", encoding="utf-8")
    with open(path, "rb") as fh:
        response = client.post(reverse("datasets:upload_new", args=[dataset.pk]), {"file": fh})
    upload = Upload.objects.get()
    assert upload.status == Upload.Status.NEEDS_MAPPING
    assert response["Location"] == reverse("datasets:upload_mapping", args=[upload.pk])
    page = client.get(response["Location"]).content.decode()
    assert "question" in page and "answer" in page
    response = client.post(
        response["Location"], {"prompt": "question", "response": "answer", "system": "", "tags": "topic"}
    )
    upload.refresh_from_db()
    assert upload.status == Upload.Status.QUEUED and upload.csv_mapping["prompt"] == "question"
    imports.process(upload.pk)
    ex = Example.objects.get()
    assert ex.messages == [
        {"role": "user", "content": "Where is my order?"},
        {"role": "assistant", "content": "It ships today."},
    ]
    assert ex.tags == ["shipping"]


def test_oversized_web_upload_is_stopped_with_a_clear_error(curator, client_for, settings, tmp_path):
    settings.STUDIO_UPLOAD_MAX_BYTES = 1024
    dataset = datasets.create_dataset("Small", "sft", curator)
    path = write_jsonl(tmp_path / "big.jsonl", GOOD * 20)
    with open(path, "rb") as fh:
        response = client_for(curator).post(reverse("datasets:upload_new", args=[dataset.pk]), {"file": fh})
    assert response.status_code == 200
    assert "larger than the upload limit of 1.0 KB" in response.content.decode()
    assert Upload.objects.count() == 0
    assert not any(Path(settings.FILE_UPLOAD_TEMP_DIR).iterdir())


def test_preference_dataset_import_scan_freeze_export(curator, tmp_path):
    ds = datasets.create_dataset("Prefs", "preference", curator)
    rows = [
        {
            "prompt": "Write to jane.doe@example.com about order ORD-100200.",
            "chosen": "Sure, drafting it now.",
            "rejected": "No.",
        },
        {
            "messages": [{"role": "user", "content": "Say hi"}],
            "chosen": [{"role": "assistant", "content": "Hi there!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        {"prompt": "Same", "chosen": "x", "rejected": "x"},
    ]
    result = import_file(ds, write_jsonl(tmp_path / "p.jsonl", rows))
    assert (result.imported, result.rejected) == (2, 1)
    assert result.rejections[0]["code"] == "identical_pair"
    ex = Example.objects.filter(dataset=ds).order_by("position").last()
    assert (
        ex.chosen == "Hi there!"
        and ex.rejected == "Go away."
        and ex.messages == [{"role": "user", "content": "Say hi"}]
    )
    scrub.scan_examples(ds)
    scrub.apply_all(ds, curator)
    version = versions.freeze(ds, curator)
    lines = [json.loads(b) for b in versions.export_lines(version)]
    assert lines[0]["messages"][0]["content"] == "Write to <EMAIL_ADDRESS_1> about order ORD-100200."
    assert lines[1]["chosen"] == "Hi there!" and lines[1]["rejected"] == "Go away."
    # an SFT file cannot go into a preference dataset
    sft = import_file(ds, write_jsonl(tmp_path / "s.jsonl", GOOD))
    assert sft.imported == 0 and "preference" in Upload.objects.order_by("-pk").first().error_text.lower()
