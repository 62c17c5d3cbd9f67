"""Review 8: dataset versions — round trip, immutability, diff, export, freezing.

Real data throughout: non-ASCII text, system messages, tags, preference pairs, dropped and edited
examples, train/eval/golden splits.
"""

from __future__ import annotations

import hashlib
import json
import threading
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import ProtectedError
from django.urls import reverse

from datasets_app.models import Dataset, DatasetVersion, Example, VersionExample
from datasets_app.services import datasets, imports, scrub, versions
from studio.models import AuditEvent

pytestmark = pytest.mark.django_db

# no names or places, so the PII scan leaves the text as written
SFT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Antworte kurz. Ünïcödé ✓ 日本語のテスト"},
            {"role": "user", "content": "Wo ist Bestellung ORD-449812? Größe: XL"},
            {"role": "assistant", "content": "Unterwegs — Lieferung morgen. 🚚"},
        ],
        "tags": ["versand", "größe"],
    },
    {
        "messages": [
            {"role": "user", "content": 'zwei\nZeilen\ttab "quoted" \\ back'},
            {"role": "assistant", "content": "ok\r\ndanke"},
        ]
    },
    {
        "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        "tags": ["math"],
    },
    {"messages": [{"role": "user", "content": "Drop me please"}, {"role": "assistant", "content": "gone"}]},
    {
        "messages": [
            {"role": "user", "content": "¿Qué tal? ☕"},
            {"role": "assistant", "content": "Bien, ¡gracias!"},
        ],
        "tags": ["es"],
    },
]

PREF_ROWS = [
    {"prompt": "Sag hallo ✓", "chosen": "Hallo! 👋", "rejected": "Nein.", "tags": ["gruß"]},
    {
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    },
    {"prompt": "Dritter Fall — ½", "chosen": "ja", "rejected": "nein", "tags": ["x", "y"]},
    {"prompt": "Vierter", "chosen": "gut", "rejected": "schlecht"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def import_file(dataset: Dataset, path: Path, user=None):
    upload = imports.receive_path(dataset, user, path)
    return imports.process(upload.pk)


def ready(dataset, curator):
    """Scanned: the PII scanner would take parts of the German/Spanish text for names, so examples
    are marked clean here (the scrub itself runs for real in the immutability test)."""
    Example.objects.filter(dataset=dataset).update(pii_status=Example.Pii.CLEAN)
    return dataset


def scrubbed(dataset, curator):
    scrub.scan_examples(dataset)
    scrub.apply_all(dataset, curator)
    return dataset


def export_bytes(version) -> bytes:
    return b"".join(versions.export_lines(version))


def cli_export(version, path: Path) -> tuple[bytes, str]:
    err = StringIO()
    call_command("export_dataset", str(version.pk), "--out", str(path), stdout=StringIO(), stderr=err)
    return path.read_bytes(), err.getvalue()


def content(version) -> list[tuple]:
    return list(
        version.examples.order_by("position").values_list("messages", "chosen", "rejected", "tags", "split")
    )


def curated_sft(curator, tmp_path, name="Runde") -> Dataset:
    """Imported, one example edited, one dropped, split train/eval/golden, scanned."""
    ds = datasets.create_dataset(name, "sft", curator)
    assert import_file(ds, write_jsonl(tmp_path / f"{name}.jsonl", SFT_ROWS)).imported == 5
    ready(ds, curator)
    exs = list(Example.objects.filter(dataset=ds).order_by("position"))
    msgs = [*exs[2].messages[:1], {"role": "assistant", "content": "vier (4) — sicher ✓"}]
    datasets.edit_example(exs[2], messages=msgs, tags=["math", "bearbeitet"], split="eval", user=curator)
    Example.objects.filter(pk=exs[3].pk).update(dropped=True)
    Example.objects.filter(pk=exs[4].pk).update(split="golden")
    return ready(ds, curator)


# --- 1. round trip ------------------------------------------------------------------------------------


def test_round_trip_sft_gives_same_examples_order_and_canonical_sha(curator, tmp_path):
    ds = curated_sft(curator, tmp_path)  # train, train, eval (edited), golden: the importer reads them back
    v1 = versions.freeze(ds, curator, "original")
    data = export_bytes(v1)
    assert not data.startswith(b"\xef\xbb\xbf")
    assert len(data.split(b"\n")) == v1.counts["examples"] + 1 == 5  # the dropped one is not exported
    (tmp_path / "export.jsonl").write_bytes(data)
    ds2 = datasets.create_dataset("Runde zurück", "sft", curator)
    result = import_file(ds2, tmp_path / "export.jsonl")
    assert (result.imported, result.rejected) == (4, 0)
    v2 = versions.freeze(ready(ds2, curator), curator)
    assert content(v2) == content(v1)
    assert [r[0][0]["role"] for r in content(v2)] == ["system", "user", "user", "user"]
    assert [r[4] for r in content(v2)] == ["train", "train", "eval", "golden"]
    # ids and positions differ, the canonical SHA-256 and the file do not
    assert set(v1.examples.values_list("example_id", flat=True)).isdisjoint(
        v2.examples.values_list("example_id", flat=True)
    )
    assert v2.sha256 == v1.sha256
    assert export_bytes(v2) == data


def test_round_trip_preference_with_splits(curator, tmp_path):
    ds = datasets.create_dataset("Paare", "preference", curator)
    assert import_file(ds, write_jsonl(tmp_path / "p.jsonl", PREF_ROWS)).imported == 4
    ready(ds, curator)
    versions.split_by_ratio(ds, 2, 1, 1, 5, curator)
    v1 = versions.freeze(ds, curator)
    assert sorted(v1.examples.values_list("split", flat=True)) == ["eval", "golden", "train", "train"]
    (tmp_path / "back.jsonl").write_bytes(export_bytes(v1))
    ds2 = datasets.create_dataset("Paare zurück", "preference", curator)
    assert import_file(ds2, tmp_path / "back.jsonl").imported == 4
    ready(ds2, curator)
    # same messages, chosen/rejected, tags and splits in the same order: the split is part of the
    # version's content (what is trained on, what is held out) and the importer reads it back
    v2 = versions.freeze(ds2, curator)
    assert content(v2) == content(v1)
    assert content(v1)[1][1:3] == ("4", "5") and content(v1)[1][0][0]["role"] == "system"
    assert v2.sha256 == v1.sha256 and export_bytes(v2) == export_bytes(v1)


def test_export_file_sha256_is_the_same_on_the_page_the_cli_and_the_download(
    curator, engineer, client_for, tmp_path
):
    ds = curated_sft(curator, tmp_path)
    version = versions.freeze(ds, curator, "prüfbar")
    cli_bytes, cli_err = cli_export(version, tmp_path / "cli.jsonl")
    response = client_for(engineer).get(reverse("datasets:version_export", args=[version.pk]))
    web_bytes = b"".join(response.streaming_content)
    assert web_bytes == cli_bytes == export_bytes(version)
    file_sha = hashlib.sha256(cli_bytes).hexdigest()
    assert file_sha != version.sha256  # the canonical content hash is not the file's
    assert versions.export_sha256(version) == file_sha
    assert f"file sha256 {file_sha}" in cli_err
    assert response["X-Content-SHA256"] == file_sha
    page = client_for(engineer).get(reverse("datasets:version", args=[version.pk]))
    assert file_sha in page.content.decode() and version.sha256 in page.content.decode()
    # a version frozen before the value was recorded: computed from the file the same way
    counts = {k: v for k, v in version.counts.items() if k != versions.EXPORT_SHA256}
    DatasetVersion.objects.filter(pk=version.pk).update(counts=counts)
    assert versions.export_sha256(DatasetVersion.objects.get(pk=version.pk)) == file_sha


# --- 4. export format -----------------------------------------------------------------------------------


def test_export_keeps_one_object_per_line_with_unicode_line_separators(curator, tmp_path):
    texts = ["erste\u2028zweite", "para\u2029graph", "next\x85line", "ok ✓"]
    rows = [
        {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "ja"}]} for t in texts
    ]
    ds = datasets.create_dataset("Trenner", "sft", curator)
    assert import_file(ds, write_jsonl(tmp_path / "t.jsonl", rows)).imported == 4
    version = versions.freeze(ready(ds, curator), curator)
    data, _ = cli_export(version, tmp_path / "t-out.jsonl")
    text = data.decode("utf-8")
    # str.splitlines(), editors and line-based tools end a line at U+2028/U+2029/U+0085 too
    lines = text.splitlines()
    assert len(lines) == 4
    assert [json.loads(line)["messages"][0]["content"] for line in lines] == texts
    assert hashlib.sha256(data).hexdigest() == versions.export_sha256(version)


def test_export_is_streamed_in_import_order_and_role_checked(
    curator, engineer, reviewer, client_for, tmp_path
):
    ds = curated_sft(curator, tmp_path)
    version = versions.freeze(ds, curator)
    response = client_for(curator).get(reverse("datasets:version_export", args=[version.pk]))
    assert response.streaming and response["Content-Type"] == "application/jsonl"
    rows = [json.loads(line) for line in b"".join(response.streaming_content).split(b"\n") if line]
    assert [r["messages"][-1]["content"] for r in rows] == [
        "Unterwegs — Lieferung morgen. 🚚",
        "ok\r\ndanke",
        "vier (4) — sicher ✓",
        "Bien, ¡gracias!",
    ]
    assert [r["split"] for r in rows] == ["train", "train", "eval", "golden"]
    assert rows[2]["tags"] == ["math", "bearbeitet"] and "tags" not in rows[1]
    assert client_for(reviewer).get(reverse("datasets:version_export", args=[version.pk])).status_code == 403
    assert client_for(None).get(reverse("datasets:version_export", args=[version.pk])).status_code == 302
    assert (
        client_for(engineer).get(reverse("datasets:version_export", args=[version.pk + 99])).status_code
        == 404
    )


# --- 2. immutability ------------------------------------------------------------------------------------


def test_curation_after_freezing_never_changes_a_version(curator, tmp_path, settings):
    ds = curated_sft(curator, tmp_path)
    version = versions.freeze(ds, curator, "v1")
    before = (export_bytes(version), version.sha256, version.counts, content(version))
    # edit, tag, split, drop, restore, scrub, re-import
    exs = list(Example.objects.filter(dataset=ds).order_by("position"))
    datasets.edit_example(
        exs[0],
        messages=[
            {"role": "user", "content": "Call +1 415 555 0100, Mr John Smith"},
            {"role": "assistant", "content": "ok"},
        ],
        tags=["neu"],
        split="golden",
        user=curator,
    )
    Example.objects.filter(pk=exs[1].pk).update(dropped=True)
    Example.objects.filter(pk=exs[3].pk).update(dropped=False)
    versions.split_by_ratio(ds, 1, 1, 1, 9, curator)
    scrubbed(ds, curator)
    assert "John Smith" not in json.dumps(Example.objects.get(pk=exs[0].pk).messages)
    import_file(ds, write_jsonl(tmp_path / "more.jsonl", SFT_ROWS))
    scrubbed(ds, curator)
    v2 = versions.freeze(ds, curator, "v2")
    version = DatasetVersion.objects.get(pk=version.pk)
    assert (export_bytes(version), version.sha256, version.counts, content(version)) == before
    assert v2.sha256 != version.sha256
    with pytest.raises(PermissionError):
        version.save()
    # deleting the dataset is refused as a whole (versions are protected): nothing half-deleted
    n_examples = Example.objects.filter(dataset=ds).count()
    with pytest.raises(ProtectedError):
        Dataset.objects.get(pk=ds.pk).delete()
    assert Example.objects.filter(dataset=ds).count() == n_examples
    assert DatasetVersion.objects.filter(dataset=ds).count() == 2
    assert export_bytes(DatasetVersion.objects.get(pk=version.pk)) == before[0]


def test_a_version_used_by_a_training_job_cannot_be_deleted(curator, engineer, tmp_path):
    from training_app.models import BaseModel, TrainingJob

    ds = curated_sft(curator, tmp_path)
    version = versions.freeze(ds, curator)
    base = BaseModel.objects.create(
        name="tiny", source_kind="local", source=str(tmp_path), context_length=512
    )
    TrainingJob.objects.create(
        dataset_version=version, base_model=base, method="lora", model_name="m", created_by=engineer
    ) if "created_by" in {f.name for f in TrainingJob._meta.fields} else TrainingJob.objects.create(
        dataset_version=version, base_model=base, method="lora", model_name="m"
    )
    rows = version.examples.count()
    with pytest.raises(ProtectedError):
        DatasetVersion.objects.get(pk=version.pk).delete()
    assert VersionExample.objects.filter(version=version).count() == rows == 4


# --- 3. diff ---------------------------------------------------------------------------------------------


def test_diff_of_edits_drops_restores_and_duplicates(curator, tmp_path):
    ds = curated_sft(curator, tmp_path)
    v1 = versions.freeze(ds, curator)
    exs = list(Example.objects.filter(dataset=ds).order_by("position"))
    # drop one, restore the one dropped before v1, edit one, retag one, re-import a duplicate of one
    Example.objects.filter(pk=exs[0].pk).update(dropped=True)
    Example.objects.filter(pk=exs[3].pk).update(dropped=False)
    datasets.edit_example(exs[1], messages=exs[1].messages, tags=["neu"], user=curator)
    datasets.edit_example(
        exs[4], messages=[exs[4].messages[0], {"role": "assistant", "content": "¡Muy bien!"}], user=curator
    )
    import_file(ds, write_jsonl(tmp_path / "dup.jsonl", SFT_ROWS[2:3]))
    ready(ds, curator)
    v2 = versions.freeze(ds, curator)
    d = versions.diff(v1, v2)
    new_ids = dict(v2.examples.values_list("pk", "example_id"))
    old_ids = dict(v1.examples.values_list("pk", "example_id"))
    assert sorted(new_ids[pk] for pk in d.added) == sorted([exs[3].pk, max(new_ids.values())])
    assert [old_ids[pk] for pk in d.removed] == [exs[0].pk]
    assert sorted(new_ids[b] for _, b in d.changed) == [exs[1].pk, exs[4].pk]
    assert v2.diff_summary == d.summary() == {"added": 2, "removed": 1, "changed": 2}
    assert versions.diff(v2, v2).summary() == {"added": 0, "removed": 0, "changed": 0}


def test_diff_pages_through_big_versions(curator, client_for, tmp_path):
    ds = datasets.create_dataset("Groß", "sft", curator)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Frage {i} ✓"},
                {"role": "assistant", "content": f"Antwort {i}"},
            ]
        }
        for i in range(130)
    ]
    import_file(ds, write_jsonl(tmp_path / "a.jsonl", rows[:10]))
    Example.objects.filter(dataset=ds).update(pii_status=Example.Pii.CLEAN)
    v1 = versions.freeze(ds, curator)
    import_file(ds, write_jsonl(tmp_path / "b.jsonl", rows[10:]))
    Example.objects.filter(dataset=ds).update(pii_status=Example.Pii.CLEAN)
    v2 = versions.freeze(ds, curator)
    assert v2.diff_summary == {"added": 120, "removed": 0, "changed": 0}
    client = client_for(curator)
    url = reverse("datasets:version_diff", args=[v2.pk, v1.pk])
    first = client.get(url)
    assert first.context["summary"] == {"added": 120, "removed": 0, "changed": 0}
    assert len(first.context["added"]) == 50 and "?page=2" in first.content.decode()
    last = client.get(url + "?page=3")
    shown = [ex.messages[0]["content"] for ex in last.context["added"]]
    assert shown == [f"Frage {i} ✓" for i in range(110, 130)]
    assert "?page=4" not in last.content.decode()
    page = versions.diff_page(v1, v2, page=2, limit=50)
    assert page.summary["added"] == 120 and len(page.added) == 50
    assert client.get(url + "?page=abc").status_code == 200


def test_diff_across_two_datasets_is_refused(curator, client_for, tmp_path):
    a = curated_sft(curator, tmp_path, "A")
    b = curated_sft(curator, tmp_path, "B")
    va, vb = versions.freeze(a, curator), versions.freeze(b, curator)
    assert client_for(curator).get(reverse("datasets:version_diff", args=[va.pk, vb.pk])).status_code == 404


# --- freezing ---------------------------------------------------------------------------------------------


def test_freeze_failing_half_way_leaves_nothing_and_no_gap(curator, tmp_path, monkeypatch):
    ds = curated_sft(curator, tmp_path)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(versions, "token_stats", boom)
    with pytest.raises(RuntimeError):
        versions.freeze(ds, curator)
    assert not DatasetVersion.objects.exists() and not VersionExample.objects.exists()
    monkeypatch.undo()
    assert versions.freeze(ds, curator).number == 1


@pytest.mark.django_db(transaction=True)
def test_curators_freezing_at_once_make_one_version_and_the_others_are_shown_it(curator, make_user, tmp_path):
    """Four freezes of the same content at once (two curators, double clicks): one makes version 1, the
    other three wait for its lock and are refused as nothing changed, naming it; no duplicate, no error."""
    other = make_user("cora", "curator")
    ds = curated_sft(curator, tmp_path)
    barrier, results, same, errors = threading.Barrier(4), [], [], []

    def run(user):
        try:
            barrier.wait(timeout=10)
            results.append(versions.freeze(Dataset.objects.get(pk=ds.pk), user).number)
        except versions.NothingChanged as exc:
            same.append(exc.version.number)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(u,)) for u in (curator, other, curator, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [1] and same == [1, 1, 1]
    assert DatasetVersion.objects.count() == 1 and DatasetVersion.objects.get().examples.count() == 4


def test_the_freeze_form_sent_twice_shows_the_version_it_made(curator, client_for, tmp_path):
    ds = curated_sft(curator, tmp_path, name="twice")
    client = client_for(curator)
    first = client.post(reverse("datasets:freeze", args=[ds.pk]), {"changelog": "first"})
    version = DatasetVersion.objects.get(dataset=ds)
    assert first.status_code == 302 and first.url == version.get_absolute_url()
    again = client.post(reverse("datasets:freeze", args=[ds.pk]), {"changelog": "first"}, follow=True)
    assert again.redirect_chain[-1][0] == version.get_absolute_url()  # the version, not an error page
    page = again.content.decode()
    assert "Not frozen again: Nothing changed since version 1" in page
    assert DatasetVersion.objects.filter(dataset=ds).count() == 1
    assert AuditEvent.objects.filter(verb="dataset.freeze").count() == 1  # the refused one recorded nothing
