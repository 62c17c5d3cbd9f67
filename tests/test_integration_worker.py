"""The curator's whole flow through a real Celery worker process: upload → scan → review → freeze →
export, against the configured database and broker (PostgreSQL + Redis in CI, SQLite + the
filesystem broker locally). Canary values planted in the upload must be gone from every table, the
data dir and the logs afterwards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import wait_for
from django.apps import apps
from django.db import connection
from django.urls import reverse

from datasets_app.models import Dataset, DatasetVersion, Example, PiiFinding, Upload

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parent.parent
CANARIES = {
    "name": "Zebulon Quartermaine",
    "email": "zq.canary.7731@example.org",
    "phone": "415-555-0199",
    "card": "4111 1111 1111 1111",
    "missed": "Xantippa",  # a nickname the scanner is not expected to know; the curator marks it
}


@pytest.fixture
def worker(start_worker):
    """A real `celery worker` process on queue "curation" sharing the test database and data dir."""
    return start_worker("curation")


def upload_rows() -> list[dict]:
    c = CANARIES
    return [
        {
            "messages": [
                {
                    "role": "user",
                    "content": f"Hello, my name is {c['name']} and order ORD-558812 never arrived.",
                },
                {
                    "role": "assistant",
                    "content": f"I'm sorry, {c['name']}. I can see ORD-558812; it left the depot.",
                },
                {"role": "user", "content": f"Email me at {c['email']} or call {c['phone']}."},
                {"role": "assistant", "content": "I will send the tracking details there."},
            ],
            "tags": ["shipping"],
        },
        {
            "messages": [
                {"role": "user", "content": f"Charge my card {c['card']} for SKU-TR-2210 please."},
                {"role": "assistant", "content": "Done; SKU-TR-2210 is on its way."},
            ],
            "tags": ["billing"],
        },
        {
            "messages": [
                {"role": "user", "content": f"My friends call me {c['missed']}, put that on the parcel."},
                {"role": "assistant", "content": "Noted, the parcel label is updated."},
            ],
            "tags": ["shipping"],
        },
        {
            "messages": [
                {"role": "user", "content": "Does the Router X200 support WPA3?"},
                {"role": "assistant", "content": "Yes, firmware 2.4.1 adds WPA3."},
            ]
        },
    ]


def test_upload_scan_review_freeze_export_through_a_worker(worker, curator, client_for, settings, tmp_path):
    client = client_for(curator)
    client.post(reverse("datasets:create"), {"name": "Integration", "kind": "sft", "description": ""})
    dataset = Dataset.objects.get(name="Integration")
    path = tmp_path / "upload.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in upload_rows()) + "\n{not json\n", encoding="utf-8")
    with open(path, "rb") as fh:
        response = client.post(reverse("datasets:upload_new", args=[dataset.pk]), {"file": fh})
    upload = Upload.objects.get(dataset=dataset)
    assert response["Location"] == upload.get_absolute_url()

    # the worker imports, then scans
    wait_for(
        lambda: Upload.objects.get(pk=upload.pk).status == Upload.Status.IMPORTED, worker, what="the import"
    )
    wait_for(
        lambda: not Example.objects.filter(dataset=dataset, pii_status="unscanned").exists(),
        worker,
        what="the PII scan",
    )
    upload.refresh_from_db()
    assert (upload.imported_count, upload.rejected_count) == (4, 1)
    assert upload.report["first"][0]["line"] == 5
    page = client.get(reverse("datasets:upload", args=[upload.pk])).content.decode()
    assert "Line" in page or "line" in page

    found = set(PiiFinding.objects.filter(dataset=dataset).values_list("entity_type", flat=True))
    assert {"PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD"} <= found

    # review: accept one email finding inline (HTMX), keep a false positive if any, mark the missed name
    email = PiiFinding.objects.get(dataset=dataset, entity_type="EMAIL_ADDRESS")
    response = client.post(
        reverse("datasets:pii_decide", args=[dataset.pk]),
        {"finding": email.pk, "action": "accept"},
        HTTP_HX_REQUEST="true",
    )
    assert response.status_code == 200
    from datasets_app.services.scrub import finding_context

    false_positives = [
        f.pk
        for f in PiiFinding.objects.filter(dataset=dataset, decision="pending").select_related("example")
        if not any(v in finding_context(f, f.example)["value"] for v in CANARIES.values())
    ]
    for pk in false_positives:  # the curator keeps what is not personal data
        client.post(reverse("datasets:pii_decide", args=[dataset.pk]), {"finding": pk, "action": "reject"})
    ex3 = Example.objects.get(dataset=dataset, position=2)
    start = ex3.messages[0]["content"].index(CANARIES["missed"])
    client.post(
        reverse("datasets:example_mark", args=[ex3.pk]),
        {"segment": 0, "start": start, "end": start + len(CANARIES["missed"]), "entity_type": "PERSON"},
    )
    for t in sorted(
        set(
            PiiFinding.objects.filter(dataset=dataset, decision="pending").values_list(
                "entity_type", flat=True
            )
        )
    ):
        client.post(reverse("datasets:pii_decide_type", args=[dataset.pk]), {"type": t, "action": "accept"})

    # an edit is re-scanned by the worker
    ex4 = Example.objects.get(dataset=dataset, position=3)
    client.post(
        reverse("datasets:example", args=[ex4.pk]),
        {
            "content_0": "Does the Router X200 support WPA3? Reply to 212-555-0147.",
            "content_1": ex4.messages[1]["content"],
            "tags": "wifi",
            "split": "train",
        },
    )
    wait_for(lambda: Example.objects.get(pk=ex4.pk).pii_status != "unscanned", worker, what="the re-scan")
    assert PiiFinding.objects.filter(example=ex4, entity_type="PHONE_NUMBER", decision="pending").exists()
    client.post(
        reverse("datasets:pii_decide_type", args=[dataset.pk]), {"type": "PHONE_NUMBER", "action": "accept"}
    )

    response = client.post(reverse("datasets:freeze", args=[dataset.pk]), {"changelog": "integration"})
    version = DatasetVersion.objects.get(dataset=dataset)
    assert response["Location"] == version.get_absolute_url()
    export = b"".join(
        client.get(reverse("datasets:version_export", args=[version.pk])).streaming_content
    ).decode()
    rows = [json.loads(line) for line in export.splitlines()]
    assert len(rows) == 4
    first = " ".join(m["content"] for m in rows[0]["messages"])
    labels = re.findall(r"<PERSON_\d+>", first)
    assert len(labels) == 2 and labels[0] == labels[1]  # the same person, the same pseudonym
    assert "ORD-558812" in first  # business identifiers are kept
    assert "SKU-TR-2210" in export and "Router X200" in export

    # canaries: nowhere in the database, the data dir or the logs
    assert_no_canaries_anywhere(settings, worker)


def _database_text() -> str:
    """Every row of every table, as text (live data; see the README on PostgreSQL dead tuples)."""
    chunks = []
    with connection.cursor() as cur:
        for model in apps.get_models():
            table = connection.ops.quote_name(model._meta.db_table)
            cur.execute(f"SELECT * FROM {table}")  # noqa: S608 - table names from the app registry
            for row in cur.fetchall():
                chunks.append(repr(row))
    return "\n".join(chunks)


def assert_no_canaries_anywhere(settings, worker) -> None:
    db_text = _database_text()
    places = {"database rows": db_text.encode()}
    if connection.vendor == "sqlite":
        connection.close()  # release the file so the WAL is checkpointed
        for suffix in ("", "-wal"):
            p = Path(connection.settings_dict["NAME"] + suffix)
            if p.exists():
                places[f"database file {p.name}"] = p.read_bytes()
    for p in Path(settings.DATA_DIR).rglob("*"):
        if p.is_file():
            places[f"data dir {p.relative_to(settings.DATA_DIR)}"] = p.read_bytes()
    places["worker output"] = worker["log"].read_bytes()
    for p in worker["log_dir"].rglob("*"):
        if p.is_file():
            places[f"worker log {p.name}"] = p.read_bytes()
    leaks = [
        f"{label!r} in {where}"
        for where, blob in places.items()
        for label, value in CANARIES.items()
        if value.encode() in blob or value.lower().encode() in blob
    ]
    assert not leaks, leaks
