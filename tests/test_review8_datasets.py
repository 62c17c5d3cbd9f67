"""Review 8 of the dataset curation app: races between curators, stale forms and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.contrib.messages import get_messages
from django.db.models import QuerySet
from django.urls import reverse
from test_datasets import GOOD

from datasets_app.models import Dataset, Example, PiiFinding, Upload
from datasets_app.parsing import CsvMapping
from datasets_app.services import datasets, imports, scrub, versions

pytestmark = pytest.mark.django_db

ROWS = GOOD  # two conversations with a name, an e-mail address, an order number and a SKU


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def dataset(curator):
    return datasets.create_dataset("Review 8", "sft", curator)


@pytest.fixture
def scanned(dataset, curator, tmp_path):
    upload = imports.receive_path(dataset, curator, write_jsonl(tmp_path / "r8.jsonl", ROWS))
    imports.process(upload.pk)
    scrub.scan_examples(dataset)
    return dataset


def email_example() -> Example:
    return Example.objects.get(position=1)


# --- PII decisions ------------------------------------------------------------------------------------


def test_pii_decide_with_an_id_beyond_64_bits_is_not_a_server_error(scanned, curator, client_for):
    client = client_for(curator)
    client.raise_request_exception = False
    response = client.post(
        reverse("datasets:pii_decide", args=[scanned.pk]), {"finding": "9" * 25, "action": "accept"}
    )
    assert response.status_code == 302
    assert response["Location"] == reverse("datasets:pii", args=[scanned.pk])
    assert not PiiFinding.objects.exclude(decision=PiiFinding.Decision.PENDING).exists()


def test_a_finding_accepted_twice_at_once_is_scrubbed_once(scanned, curator):
    """Two curators (or a double click) accept the same e-mail finding: the second request read it
    while it was still pending. Applying its stale offsets again cut into the pseudonym."""
    finding = PiiFinding.objects.filter(example=email_example(), entity_type="EMAIL_ADDRESS").first()
    stale = PiiFinding.objects.get(pk=finding.pk)  # read by the second request before the first commits
    assert scrub.decide(scanned, [finding.pk], True, curator) == 1
    after_first = email_example().messages
    assert "<EMAIL_ADDRESS_1>" in after_first[finding.segment]["content"]
    assert scrub.redact(scanned, [stale], curator) == 0
    assert email_example().messages == after_first


def test_keeping_a_finding_scrubbed_meanwhile_leaves_it_scrubbed(scanned, curator):
    finding = PiiFinding.objects.filter(example=email_example(), entity_type="EMAIL_ADDRESS").first()
    stale = PiiFinding.objects.get(pk=finding.pk)
    scrub.decide(scanned, [finding.pk], True, curator)
    assert scrub.keep([stale], curator) == 0
    finding.refresh_from_db()
    assert finding.decision == PiiFinding.Decision.REDACT
    assert email_example().kept_digests == []


# --- editing examples ---------------------------------------------------------------------------------


def _edit_token(html: str) -> str:
    return re.search(r'name="loaded" value="([0-9a-f]{64})"', html).group(1)


def test_a_stale_edit_form_does_not_bring_back_scrubbed_text(scanned, curator, client_for):
    """Curator A opens the example; curator B scrubs the e-mail address; A saves the (old) form to fix
    a tag. The raw address must not come back: the edit is refused with a reason."""
    ex = email_example()
    client = client_for(curator)
    url = reverse("datasets:example", args=[ex.pk])
    token = _edit_token(client.get(url).content.decode())
    old = {f"content_{i}": m["content"] for i, m in enumerate(ex.messages)}
    for t in scrub.pending_types(scanned):
        scrub.decide_type(scanned, t, True, curator)
    response = client.post(url, {**old, "tags": "billing", "split": "train", "loaded": token})
    assert response.status_code == 200
    assert "changed since you opened it" in response.content.decode()
    ex.refresh_from_db()
    assert "maria.gonzalez@example.com" not in json.dumps(ex.messages)
    assert ex.tags == [] and ex.pii_status == Example.Pii.REVIEWED
    # the page now shows the current text with a fresh token: saving that works
    token = _edit_token(response.content.decode())
    current = {f"content_{i}": m["content"] for i, m in enumerate(ex.messages)}
    response = client.post(url, {**current, "tags": "billing", "split": "train", "loaded": token})
    assert response.status_code == 302
    ex.refresh_from_db()
    assert ex.tags == ["billing"]


def test_an_edit_does_not_undo_a_drop_made_meanwhile(scanned, curator):
    ex = email_example()  # read by the edit request
    Example.objects.filter(pk=ex.pk).update(dropped=True)  # another curator drops it meanwhile
    datasets.edit_example(ex, messages=ex.messages, tags=["billing"], user=curator)
    ex = Example.objects.get(pk=ex.pk)
    assert ex.dropped is True and ex.tags == ["billing"]


# --- uploads ------------------------------------------------------------------------------------------


def test_a_second_csv_mapping_does_not_requeue_an_import_under_way(dataset, curator, tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("question,answer\nWhere is my order?,It ships today.\n", encoding="utf-8")
    upload = imports.receive_path(dataset, curator, path)
    Upload.objects.filter(pk=upload.pk).update(status=Upload.Status.NEEDS_MAPPING)
    stale = Upload.objects.get(pk=upload.pk)  # the second form submit read it here
    Upload.objects.filter(pk=upload.pk).update(status=Upload.Status.PROCESSING)  # the first one's import
    mapped = imports.set_csv_mapping(stale, CsvMapping(prompt="answer", response="question"))
    upload.refresh_from_db()
    assert mapped is False
    assert upload.status == Upload.Status.PROCESSING and upload.csv_mapping is None


def test_csv_mapping_view_refuses_when_the_columns_were_chosen_meanwhile(
    dataset, curator, client_for, tmp_path, monkeypatch, django_capture_on_commit_callbacks
):
    path = tmp_path / "c.csv"
    path.write_text("question,answer\nWhere is my order?,It ships today.\n", encoding="utf-8")
    upload = imports.receive_path(dataset, curator, path)
    Upload.objects.filter(pk=upload.pk).update(status=Upload.Status.NEEDS_MAPPING)
    real = imports.csv_columns

    def columns_then_other_tab_submits(u):
        Upload.objects.filter(pk=u.pk).update(status=Upload.Status.PROCESSING)
        return real(u)

    monkeypatch.setattr(imports, "csv_columns", columns_then_other_tab_submits)
    client = client_for(curator)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(
            reverse("datasets:upload_mapping", args=[upload.pk]),
            {"prompt": "question", "response": "answer", "system": "", "tags": ""},
        )
    assert response.status_code == 302 and response["Location"] == upload.get_absolute_url()
    assert callbacks == []  # not queued a second time
    assert any("already chosen" in str(m) for m in get_messages(response.wsgi_request))
    upload.refresh_from_db()
    assert upload.status == Upload.Status.PROCESSING


# --- datasets -----------------------------------------------------------------------------------------


def test_two_curators_creating_the_same_name_at_once_get_a_clear_error(curator, monkeypatch):
    datasets.create_dataset("Claims", "sft", curator)
    # the second request checked the name before the first one's insert committed
    real, calls = QuerySet.exists, []

    def exists_before_the_other_insert(self):
        calls.append(self)
        return False if len(calls) == 1 else real(self)

    monkeypatch.setattr(QuerySet, "exists", exists_before_the_other_insert)
    with pytest.raises(datasets.EditRefused, match="already exists"):
        datasets.create_dataset("Claims", "sft", curator)
    assert Dataset.objects.filter(name="Claims").count() == 1


def test_a_zero_percent_share_gets_no_example(dataset, curator, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "ok"}]}
        for i in range(5)
    ]
    upload = imports.receive_path(dataset, curator, write_jsonl(tmp_path / "s.jsonl", rows))
    imports.process(upload.pk)
    counts = versions.split_by_ratio(dataset, 0, 50, 50, 1, curator)
    assert counts["train"] == 0 and counts["eval"] + counts["golden"] == 5
    assert not Example.objects.filter(split=Example.Split.TRAIN).exists()


def _upload_with_rejects(dataset, curator, tmp_path) -> Upload:
    path = write_jsonl(tmp_path / "rj.jsonl", ROWS)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("not json at all\n")
    upload = imports.receive_path(dataset, curator, path)
    imports.process(upload.pk)
    upload.refresh_from_db()
    assert upload.rejected_count == 1 and upload.rejects_path
    return upload


def test_rejected_lines_download_says_so_when_the_file_cannot_be_read(dataset, curator, client_for, tmp_path):
    from studio.models import AuditEvent

    upload = _upload_with_rejects(dataset, curator, tmp_path)
    client = client_for(curator)
    url = reverse("datasets:upload_rejects", args=[upload.pk])
    body = b"".join(client.get(url).streaming_content)
    assert body == b"not json at all\n"
    Path(upload.rejects_path).unlink()  # gone from the data dir (restored backup, moved volume)
    response = client.get(url)
    assert response.status_code == 302 and response["Location"] == upload.get_absolute_url()
    assert any("can no longer be read" in str(m) for m in get_messages(response.wsgi_request))
    assert AuditEvent.objects.filter(verb="upload.download_rejects").count() == 1


def test_an_upload_waiting_for_columns_links_to_the_column_choice(dataset, curator, client_for, tmp_path):
    """A curator who left the column page (or was sent to the upload's page from the dataset) had no
    way back: the CSV stayed 'Choose CSV columns' for ever, its plaintext copy on disk."""
    path = tmp_path / "c.csv"
    path.write_text("question,answer\nWhere is my order?,It ships today.\n", encoding="utf-8")
    upload = imports.receive_path(dataset, curator, path)
    Upload.objects.filter(pk=upload.pk).update(status=Upload.Status.NEEDS_MAPPING)
    html = client_for(curator).get(upload.get_absolute_url()).content.decode()
    assert reverse("datasets:upload_mapping", args=[upload.pk]) in html


def test_a_decision_without_an_action_keeps_nothing(scanned, curator, client_for):
    """A POST with no (or a mistyped) action counted as "reject": every finding of the type was kept as
    not personal data, the unsafe choice, without the curator asking for it."""
    client = client_for(curator)
    emails = PiiFinding.objects.filter(dataset=scanned, entity_type="EMAIL_ADDRESS")
    response = client.post(reverse("datasets:pii_decide_type", args=[scanned.pk]), {"type": "EMAIL_ADDRESS"})
    assert response.status_code == 302
    assert any("choose Accept" in str(m) for m in get_messages(response.wsgi_request))
    one = emails.first()
    response = client.post(
        reverse("datasets:pii_decide", args=[scanned.pk]), {"finding": one.pk, "action": "rejet"}
    )
    assert response.status_code == 302
    response = client.post(
        reverse("datasets:pii_decide", args=[scanned.pk]), {"finding": one.pk}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 400
    assert set(emails.values_list("decision", flat=True)) == {PiiFinding.Decision.PENDING}
    # the real buttons still work
    client.post(reverse("datasets:pii_decide", args=[scanned.pk]), {"finding": one.pk, "action": "reject"})
    one.refresh_from_db()
    assert one.decision == PiiFinding.Decision.KEEP


def test_drop_without_a_choice_does_not_restore_a_dropped_example(scanned, curator, client_for):
    ex = email_example()
    client = client_for(curator)
    url = reverse("datasets:example_drop", args=[ex.pk])
    client.post(url, {"drop": "1"})
    response = client.post(url, {})
    assert response.status_code == 302
    assert Example.objects.get(pk=ex.pk).dropped is True
    client.post(url, {"drop": "0"})
    assert Example.objects.get(pk=ex.pk).dropped is False


def test_marking_words_on_a_stale_page_does_not_scrub_other_words(scanned, curator, client_for):
    """The selection's offsets count characters of the text the page showed. After another curator
    scrubbed the e-mail address earlier in the message, the same offsets pointed at other words: those
    were scrubbed and "Marked and scrubbed" shown, the selected words left as they were."""
    ex = email_example()
    client = client_for(curator)
    html = client.get(reverse("datasets:example", args=[ex.pk])).content.decode()
    token = _edit_token(html)
    text = ex.messages[0]["content"]
    start = text.index("SKU-AB-1234")
    email = PiiFinding.objects.get(example=ex, segment=0, entity_type="EMAIL_ADDRESS")
    scrub.decide(scanned, [email.pk], True, curator)  # another curator, meanwhile
    before = email_example().messages
    response = client.post(
        reverse("datasets:example_mark", args=[ex.pk]),
        {"segment": 0, "start": start, "end": start + 11, "entity_type": "PERSON", "loaded": token},
    )
    assert response.status_code == 302
    assert any("changed since you opened it" in str(m) for m in get_messages(response.wsgi_request))
    assert email_example().messages == before
    assert not PiiFinding.objects.filter(example=ex, source="curator").exists()
    # on the current page the same words are marked where they are now
    token = _edit_token(client.get(reverse("datasets:example", args=[ex.pk])).content.decode())
    start = before[0]["content"].index("SKU-AB-1234")
    client.post(
        reverse("datasets:example_mark", args=[ex.pk]),
        {"segment": 0, "start": start, "end": start + 11, "entity_type": "PERSON", "loaded": token},
    )
    assert "SKU-AB-1234" not in email_example().messages[0]["content"]


def test_the_audit_log_never_holds_an_uploads_file_name(curator, client_for, tmp_path):
    """The audit log is append-only: nothing can scrub it later. An upload's file name may hold a
    person's name ("jane_roe_complaints.jsonl"), and it reached the log through the upload's text."""
    from studio.models import AuditEvent

    dataset = datasets.create_dataset("names", "sft", curator)
    path = write_jsonl(tmp_path / "jane_roe_complaints.jsonl", [*ROWS, {"messages": []}])
    upload = imports.receive_path(dataset, curator, path)
    imports.process(upload.pk)
    response = client_for(curator).get(reverse("datasets:upload_rejects", args=[upload.pk]))
    assert response.status_code == 200
    b"".join(response.streaming_content)
    events = AuditEvent.objects.filter(verb="upload.download_rejects")
    assert events.count() == 1
    assert not AuditEvent.objects.filter(object_repr__icontains="jane").exists()
    assert "jane" not in json.dumps(list(AuditEvent.objects.values("object_repr", "data")))
