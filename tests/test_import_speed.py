"""The import's fast path: rows prepared by a forked helper process beside the inserting one.

Small files are imported in one process; from ``imports.HELPER_MIN_BYTES`` on a forked helper parses
and validates (and another encrypts the original) while the import process inserts. Both must give the same
result, and a failure on either side must leave nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import assert_reaped
from django.db import IntegrityError, connection

from datasets_app import dedup, parsing
from datasets_app.models import Dataset, Example, Upload
from datasets_app.services import datasets, duplicates, imports, storage
from studio import forking

pytestmark = pytest.mark.django_db

ROWS = [
    {
        "messages": [
            {
                "role": "user",
                "content": f"Where is order ORD-{i}?  It was due {'today' if i % 2 else 'Monday'}.",
            },
            {"role": "assistant", "content": "It ships tomorrow." if i % 3 else "Déjà envoyée ✓"},
        ],
        "tags": ["shipping"] if i % 2 else [],
    }
    for i in range(40)
]
BAD_LINES = ['{"messages": [{"role": "user", "content": "x"}]}', "not json", '{"messages": []}']


def write_file(path: Path, rows=ROWS, bad=BAD_LINES) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    for i, line in enumerate(bad):
        lines.insert(3 + 7 * i, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(params=["in process", "helper"])
def helper(request, monkeypatch, settings):
    settings.STUDIO_IMPORT_BATCH = 7  # several batches, rejections between them
    if request.param == "helper":
        force_helper(monkeypatch)
    return request.param == "helper"


def force_helper(monkeypatch) -> None:
    monkeypatch.setattr(imports, "HELPER_MIN_BYTES", 0)
    # other tests may have left an idle daemon thread behind (tqdm's monitor): fork anyway
    monkeypatch.setattr(forking, "fork_is_safe", lambda: True)


@pytest.fixture
def dataset(curator):
    return datasets.create_dataset("Speed", "sft", curator)


def run(dataset, path):
    upload = imports.receive_path(dataset, None, path)
    raw = Path(upload.raw_path)
    return imports.process(upload.pk), raw


def test_both_paths_import_the_same_examples(dataset, helper, forks, tmp_path):
    path = write_file(tmp_path / "f.jsonl")
    result, raw = run(dataset, path)
    assert len(forks) == (2 if helper else 0)  # the preparing helper and the encrypting one
    assert_reaped(forks)
    assert (result.imported, result.rejected) == (40, 3)
    upload = Upload.objects.get()
    assert upload.status == Upload.Status.IMPORTED
    assert [(r["line"], r["code"]) for r in upload.report["first"]] == [
        (4, "no_assistant"),
        (11, "invalid_json"),
        (18, "empty_messages"),
    ]
    records = [r for r in parsing.parse_file(path) if isinstance(r, parsing.Record)]
    examples = list(dataset.examples.order_by("position"))
    assert [e.position for e in examples] == list(range(40))
    assert [(e.source_line, e.messages, e.tags) for e in examples] == [
        (r.line, r.messages, r.tags) for r in records
    ]
    # the duplicate hash is left to the duplicate analysis that follows the import
    assert {e.content_hash for e in examples} == {""}
    duplicates.recompute(dataset)
    examples = list(dataset.examples.order_by("position"))
    assert [e.content_hash for e in examples] == [dedup.content_hash(r.messages) for r in records]
    assert [e.tags_text for e in examples] == [imports.tags_text(r.tags) for r in records]
    assert Dataset.objects.get(pk=dataset.pk).next_position == 40
    # the original is encrypted (by the helper on the fast path), the plaintext gone
    assert not raw.exists() and upload.raw_path == ""
    assert b"".join(storage.decrypt_chunks(Path(upload.stored_path))) == path.read_bytes()
    rejects = b"".join(storage.decrypt_chunks(Path(upload.rejects_path))).splitlines()
    assert rejects == [line.encode() for line in BAD_LINES]


def test_whole_file_problem_from_either_path_creates_nothing(dataset, helper, forks, tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n', encoding="utf-8")
    result, raw = run(dataset, path)
    assert_reaped(forks)
    assert result.imported == 0
    upload = Upload.objects.get()
    assert upload.status == Upload.Status.REJECTED
    assert upload.report["file_error"]["code"] == "unknown_format"
    assert Example.objects.count() == 0
    assert not raw.exists() and Path(upload.stored_path).exists()


def test_database_error_with_the_helper_rolls_back_and_stops_it(dataset, helper, forks, tmp_path):
    Example.objects.create(dataset=dataset, position=20, messages=ROWS[0]["messages"], content_hash="x")
    path = write_file(tmp_path / "f.jsonl")
    with pytest.raises(IntegrityError):
        run(dataset, path)
    assert_reaped(forks)
    assert list(Example.objects.values_list("position", flat=True)) == [20]
    upload = Upload.objects.get()
    assert upload.status == Upload.Status.FAILED
    assert upload.raw_path == "" and Path(upload.stored_path).exists()
    assert b"".join(storage.decrypt_chunks(Path(upload.stored_path))) == path.read_bytes()
    assert not list(Path(upload.stored_path).parent.glob("*.part"))
    assert Dataset.objects.get(pk=dataset.pk).next_position == 0


def test_a_helper_that_dies_fails_the_import_cleanly(dataset, monkeypatch, forks, tmp_path, settings):
    settings.STUDIO_IMPORT_BATCH = 7
    force_helper(monkeypatch)
    real, test_process = imports.prepare_batches, os.getpid()

    def dies_after_two_batches(items, batch_size):
        for n, batch in enumerate(real(items, batch_size)):
            if n == 2:
                assert os.getpid() != test_process
                os._exit(3)  # in the helper: as if it were killed
            yield batch

    monkeypatch.setattr(imports, "prepare_batches", dies_after_two_batches)
    with pytest.raises(RuntimeError, match="helper process stopped"):
        run(dataset, write_file(tmp_path / "f.jsonl"))
    assert len(forks) == 2
    assert_reaped(forks)
    assert Example.objects.count() == 0
    upload = Upload.objects.get()
    assert upload.status == Upload.Status.FAILED
    assert upload.raw_path == "" and Path(upload.stored_path).exists()


def test_originals_deleted_by_setting_with_the_helper(dataset, helper, forks, settings, tmp_path):
    settings.STUDIO_ORIGINAL_UPLOADS = "delete"
    result, raw = run(dataset, write_file(tmp_path / "f.jsonl"))
    assert_reaped(forks)
    assert result.imported == 40
    upload = Upload.objects.get()
    assert not raw.exists() and upload.stored_path == ""
    originals = Path(settings.DATA_DIR) / "uploads" / "originals"
    assert not originals.exists() or not list(originals.iterdir())


def test_preference_and_csv_files_through_the_helper(curator, monkeypatch, tmp_path):
    force_helper(monkeypatch)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        json.dumps({"prompt": "Which one?", "chosen": "This one.", "rejected": "That one."}) + "\n",
        encoding="utf-8",
    )
    pref = datasets.create_dataset("Pairs", "preference", curator)
    result, _ = run(pref, pairs)
    assert result.imported == 1
    ex = pref.examples.get()
    assert (ex.chosen, ex.rejected) == ("This one.", "That one.")
    duplicates.recompute(pref)
    ex.refresh_from_db()
    assert ex.content_hash == dedup.content_hash(ex.messages, ex.chosen, ex.rejected)
    csv = tmp_path / "qa.csv"
    csv.write_text('prompt,response\nWhere is my parcel?,"On its way, today."\n', encoding="utf-8")
    sft = datasets.create_dataset("Csv", "sft", curator)
    result, _ = run(sft, csv)
    assert result.imported == 1
    assert sft.examples.get().messages[1]["content"] == "On its way, today."


def test_a_threaded_process_is_not_forked(dataset, monkeypatch, forks, tmp_path):
    monkeypatch.setattr(imports, "HELPER_MIN_BYTES", 0)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        result, _ = run(dataset, write_file(tmp_path / "f.jsonl"))
    finally:
        stop.set()
        thread.join()
    assert forks == [] and result.imported == 40


@pytest.mark.django_db(transaction=True)
def test_foreign_key_checks_are_off_only_for_the_import_on_sqlite(curator, tmp_path):
    """On SQLite the import's transaction skips the per-row foreign key checks (its two parents are
    held by the write lock) and the connection has them back afterwards; PostgreSQL keeps them."""
    dataset = datasets.create_dataset("Keys", "sft", curator)
    seen = []
    real = imports._insert_examples

    def spy(*args, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA foreign_keys" if connection.vendor == "sqlite" else "SELECT 1")
            seen.append(cursor.fetchone()[0])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imports, "_insert_examples", spy)
        result, _ = run(dataset, write_file(tmp_path / "f.jsonl"))
    assert result.imported == 40 and seen
    assert set(seen) == ({0} if connection.vendor == "sqlite" else {1})
    with pytest.raises(IntegrityError):  # enforced again on this connection
        Example.objects.create(dataset_id=dataset.pk + 1000, position=0, messages=[], content_hash="")


def test_an_upload_deleted_before_its_import_adds_nothing(dataset, monkeypatch, tmp_path):
    real = imports._open_source

    def deleted_meanwhile(upload, *args):
        Upload.objects.filter(pk=upload.pk).delete()
        return real(upload, *args)

    monkeypatch.setattr(imports, "_open_source", deleted_meanwhile)
    with pytest.raises(Upload.DoesNotExist):
        run(dataset, write_file(tmp_path / "f.jsonl"))
    assert Example.objects.count() == 0 and not Upload.objects.exists()
    assert Dataset.objects.get(pk=dataset.pk).next_position == 0


EMBEDDED_IMPORT = """
import json, sys
from pathlib import Path

import django

django.setup()
from django.core.management import call_command
from django.db import connection

call_command("migrate", verbosity=0)
from datasets_app.services import datasets, imports
from studio import forking

forks, fork = [], forking.fork
forking.fork = lambda target: forks.append(fork(target)) or forks[-1]
dataset = datasets.create_dataset("Embedded", "sft", None)
result = imports.process(imports.receive_path(dataset, None, Path(sys.argv[1])).pk)
with connection.cursor() as cursor:
    cursor.execute("PRAGMA foreign_keys")
    keys = cursor.fetchone()[0]
    cursor.execute("PRAGMA foreign_key_check")
    orphans = cursor.fetchall()
    cursor.execute(
        "SELECT COUNT(*) FROM datasets_app_example WHERE NOT (JSON_VALID(messages) AND JSON_VALID(tags)"
        " AND JSON_VALID(kept_digests) AND token_count >= 0 AND source_line >= 0)"
    )
    failing_checks = cursor.fetchone()[0]
    cursor.execute("SELECT position, source_line, messages, tags FROM datasets_app_example ORDER BY position")
    rows = cursor.fetchall()
print(json.dumps({"imported": result.imported, "rejected": result.rejected, "keys": keys, "forks": len(forks),
                  "orphans": len(orphans), "failing_checks": failing_checks, "rows": rows}))
"""


@pytest.mark.django_db(databases=[])
def test_embedded_sqlite_import_through_the_helpers_in_a_fresh_process(tmp_path):
    """The default (embedded) mode end to end on SQLite, whatever database the suite runs on: a file
    above HELPER_MIN_BYTES goes through the forked helpers, the typed parse path, the insert without
    CHECK or foreign key checks, and leaves rows that pass every one of those checks, with foreign
    keys enforced again on the connection afterwards."""
    rows = [{**ROWS[i % len(ROWS)], "tags": ["t"] if i % 2 else []} for i in range(40_000)]
    path = write_file(tmp_path / "big.jsonl", rows)
    assert path.stat().st_size > imports.HELPER_MIN_BYTES
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'embedded.sqlite3'}",
        "STUDIO_VAR_DIR": str(tmp_path / "var"),
        "STUDIO_DATA_DIR": str(tmp_path / "data"),
        "DJANGO_SETTINGS_MODULE": "studio.settings",
    }
    out = subprocess.run(
        [sys.executable, "-c", EMBEDDED_IMPORT, str(path)],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert (figures["imported"], figures["rejected"], figures["forks"]) == (40_000, 3, 2)
    assert (figures["keys"], figures["orphans"], figures["failing_checks"]) == (1, 0, 0)
    good = [r for r in parsing.parse_file(path) if isinstance(r, parsing.Record)]
    assert [(p, line, json.loads(m), json.loads(t)) for p, line, m, t in figures["rows"]] == [
        (i, r.line, r.messages, r.tags) for i, r in enumerate(good)
    ]


def test_batches_start_small_and_grow_to_the_batch_size(tmp_path):
    """The first batch reaches the inserting process a few milliseconds after the helper starts;
    the next ones grow fourfold up to STUDIO_IMPORT_BATCH, and every record comes through once, in order."""
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(2000)
    ]
    path = write_file(tmp_path / "f.jsonl", rows, bad=[])
    batches = list(imports.prepare_batches(parsing.parse_file(path, kind="sft"), 1000))
    assert [len(good) for good, _ in batches] == [64, 256, 1000, 680]
    assert [p[0] for good, _ in batches for p in good] == list(range(2000))
    assert [len(good) for good, _ in imports.prepare_batches(parsing.parse_file(path, kind="sft"), 7)][
        :3
    ] == [7, 7, 7]


@pytest.mark.parametrize("with_counts", [False, True])
def test_rows_go_in_by_statements_of_many_rows_with_their_values(dataset, tmp_path, with_counts):
    """The batch insert puts ROWS_PER_STATEMENT rows in each INSERT (and the rest in a last shorter
    one): 123 rows come out in order, each with its own values, positions from ``start`` and its
    token count (0 without counts), whether the prepared numbers are consecutive or not."""
    from studio.db import ROWS_PER_STATEMENT

    rows = [
        {
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "tags": [f"t{i % 3}"],
        }
        for i in range(123)
    ]
    path = tmp_path / "f.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    upload = imports.receive_path(dataset, None, path)
    batches = imports.prepare_batches(parsing.parse_file(path, kind="sft"), 1000)
    good = [p for batch, _rejected in batches for p in batch]
    assert len(good) == 123 > 2 * ROWS_PER_STATEMENT
    if with_counts:
        good = good[:60] + good[61:]  # a gap in the numbers, as after a too-long rejection
    counts = [1000 + i for i in range(len(good))] if with_counts else None
    statements: list[str] = []
    connection.ensure_connection()
    if connection.vendor == "sqlite":  # the statements SQLite runs (the insert bypasses Django's cursor)
        connection.connection.set_trace_callback(statements.append)
    try:
        imports._insert_examples(dataset, upload, good, 10, counts)
    finally:
        if connection.vendor == "sqlite":
            connection.connection.set_trace_callback(None)
    stored = list(Example.objects.filter(dataset=dataset).order_by("position"))
    assert [e.position for e in stored] == list(range(10, 10 + len(good)))
    kept = [r for i, r in enumerate(rows) if not (with_counts and i == 60)]
    assert [e.messages for e in stored] == [r["messages"] for r in kept]
    assert [e.tags for e in stored] == [r["tags"] for r in kept]
    assert [e.source_line for e in stored] == [i + 1 for i in range(123) if not (with_counts and i == 60)]
    assert [e.token_count for e in stored] == (counts or [0] * len(good))
    assert {e.upload_id for e in stored} == {upload.pk} and {e.split for e in stored} == {"train"}
    if connection.vendor == "sqlite":
        inserts = [s for s in statements if s.startswith("INSERT")]
        whole, rest = divmod(len(good), ROWS_PER_STATEMENT)
        assert len(inserts) == whole + (rest > 0)
        assert [s.count("), (") + 1 for s in inserts] == [ROWS_PER_STATEMENT] * whole + [rest] * (rest > 0)
