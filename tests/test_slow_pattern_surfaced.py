"""A keep-pattern that runs out of time stops the PII scan for good, and the curator is told why.

Keep-patterns are refused where they are saved when a backtracking probe makes them slow, but a pattern
stored before that probe existed, or one that passes it yet is slow on some real message, used to make
the scan fail with only the worker log saying why, and the watchdog requeued it to fail the same way
again. Now the scan ends failed (audit ``pii.scan.fail``, never requeued), the dataset page names the
pattern (never the message) and says what to do, and what was written before the stop is whole.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils.html import escape
from test_review8_datasets import dataset, write_jsonl  # noqa: F401 - fixture

from datasets_app import pii, tasks
from datasets_app.models import Dataset, Example, PiiFinding
from datasets_app.services import datasets, imports, progress, scrub, versions
from studio.models import AuditEvent

pytestmark = pytest.mark.django_db

# Valid, and it passes the save-time probe (no probe text has a "~"), yet a run of "~" not followed by
# "</b>" makes the matcher try exponentially many ways. "<", ">" and "'" also check the page escapes it.
SLOW = r"(?:~|~~)+</b>"
SECRET = "Zephyrine Quillfeather"  # words of the slow message: never on a page nor in a log
ROWS = [
    {
        "messages": [
            {"role": "user", "content": "Please email me at maria.gonzalez@example.com about SKU-AB-1234."},
            {"role": "assistant", "content": "Done, I wrote to maria.gonzalez@example.com."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": f"{SECRET} here, write to zq@example.com " + "~" * 60 + "!"},
            {"role": "assistant", "content": "Noted."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Send the invoice to ops.team@example.org please."},
            {"role": "assistant", "content": "Sent to ops.team@example.org."},
        ]
    },
]
LEAKS = (SECRET, "zq@example.com", "~" * 8)


def reason_for(pattern: str) -> str:
    return (
        f"The keep-pattern '{pattern}' took longer than 0.05 seconds on one message, so the scan stopped; "
        "nothing was changed. Simplify the pattern (avoid nested repetition such as (a+)+) or remove it in "
        "the PII settings, then scan again."
    )


@pytest.fixture
def fast_limit(monkeypatch, settings):
    """The 2 s limit lowered, one example per chunk (a stop mid-scan), no forked helpers."""
    monkeypatch.setattr(pii, "KEEP_MATCH_SECONDS", 0.05)
    settings.STUDIO_PII_BATCH = 1
    settings.STUDIO_CURATION_PROCESSES = 1


@pytest.fixture
def watchdog_beat(monkeypatch):
    """The beat's watchdog, with every scan already stale; returns (beat, datasets sent to a worker)."""
    from studio.tasks import watchdog

    sent: list[int] = []
    monkeypatch.setattr(scrub, "SCAN_STALE_AFTER", timedelta(0))
    monkeypatch.setattr(tasks.analyse_dataset, "delay", lambda pk, *a: sent.append(pk))
    return (lambda: watchdog()["scans"]), sent


def plant_keep_pattern(ds: Dataset, *patterns: str) -> None:
    """As a row stored before the save-time probe: written to the database directly."""
    policy = scrub.policy_for(ds).to_dict()
    policy["keep_patterns"] = [*policy["keep_patterns"], *patterns]
    Dataset.objects.filter(pk=ds.pk).update(pii_policy=policy)
    ds.refresh_from_db()


def import_rows(ds: Dataset, curator, tmp_path) -> list[Example]:
    upload = imports.receive_path(ds, curator, write_jsonl(tmp_path / "rows.jsonl", ROWS))
    imports.process(upload.pk)
    return list(Example.objects.filter(dataset=ds).order_by("position"))


def messages_of(ds: Dataset) -> list:
    return list(Example.objects.filter(dataset=ds).order_by("position").values_list("messages", flat=True))


def statuses(ds: Dataset) -> list[str]:
    return list(Example.objects.filter(dataset=ds).order_by("position").values_list("pii_status", flat=True))


def failures(ds: Dataset) -> list[dict]:
    return list(
        AuditEvent.objects.filter(verb=scrub.SCAN_FAIL, object_type="dataset", object_id=str(ds.pk))
        .order_by("id")
        .values_list("data", flat=True)
    )


def rescan_as(client, ds: Dataset, monkeypatch, capture) -> None:
    """The curator's "Re-scan dataset": the queued task runs here, as a worker would run it."""
    monkeypatch.setattr(tasks.scan_examples, "delay", lambda *args: tasks.scan_examples(*args))
    with capture(execute=True):
        response = client.post(reverse("datasets:pii_rescan", args=[ds.pk]))
    assert response.status_code == 302


def test_a_slow_legacy_keep_pattern_fails_the_scan_once_with_its_name_on_the_dataset_page(
    dataset,  # noqa: F811 - the fixture imported above
    curator,
    client_for,
    tmp_path,
    fast_limit,
    watchdog_beat,
    caplog,
    monkeypatch,
    django_capture_on_commit_callbacks,
):
    assert pii.PiiPolicy(keep_patterns=[SLOW]).validate() == []  # the probe lets it through
    plant_keep_pattern(dataset, SLOW)
    examples = import_rows(dataset, curator, tmp_path)
    before = messages_of(dataset)

    with caplog.at_level(logging.DEBUG):
        tasks.analyse_dataset(dataset.pk)  # as the worker runs it after an import: no exception escapes

    # failed, once, for the pattern; the next scan takes up the examples it did not reach
    assert failures(dataset) == [
        {"reason": "slow_pattern", "pattern": SLOW, "seconds": 0.05, "unscanned": 2},
    ]
    reason = reason_for(SLOW)
    assert scrub.scan_failure(dataset) == reason
    assert progress.get_progress("scan", dataset.pk) is None  # no progress bar stuck at "Scanning"

    # nothing half-applied: the first chunk's findings are whole and pending review; the slow example and
    # the one after it were not written at all; no text changed
    assert statuses(dataset) == ["pending", "unscanned", "unscanned"]
    assert set(PiiFinding.objects.filter(dataset=dataset).values_list("example_id", flat=True)) == {
        examples[0].pk
    }
    assert set(PiiFinding.objects.filter(dataset=dataset).values_list("decision", flat=True)) == {"pending"}
    assert messages_of(dataset) == before

    # the curator sees why, escaped, on the dataset page and in its polled scan status; no message text
    client = client_for(curator)
    page = client.get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    assert escape(reason) in page and SLOW not in page  # "<" and "'" escaped, never raw HTML
    assert escape(f"2 examples have not been scanned for personal data: {reason}") in page
    partial = client.get(reverse("datasets:scan_status", args=[dataset.pk])).content.decode()
    assert escape(reason) in partial and "hx-trigger" not in partial  # no polling of a stopped scan
    for text in (page, partial):
        assert not [leak for leak in LEAKS if leak in text]
    # ... and the logs hold ids and counts only
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "PII scan stopped (slow_pattern)" in logged
    assert not [leak for leak in LEAKS if leak in logged]
    with pytest.raises(versions.FreezeRefused, match="took longer than 0.05 seconds"):
        versions.freeze(dataset, curator)

    # final: the watchdog does not requeue it, however many beats
    beat, sent = watchdog_beat
    for _ in range(3):
        assert beat() == []
    assert sent == [] and len(failures(dataset)) == 1
    assert not AuditEvent.objects.filter(verb=scrub.SCAN_REQUEUE, object_id=str(dataset.pk)).exists()

    # the curator removes the pattern in the PII settings and scans again: the scan finishes
    policy = scrub.policy_for(dataset)
    policy.keep_patterns = [p for p in policy.keep_patterns if p != SLOW]
    datasets.update_policy(dataset, policy, curator)
    rescan_as(client, dataset, monkeypatch, django_capture_on_commit_callbacks)
    assert statuses(dataset) == ["pending", "pending", "pending"]
    emails = PiiFinding.objects.filter(dataset=dataset, entity_type="EMAIL_ADDRESS")
    assert set(emails.values_list("example_id", flat=True)) == {ex.pk for ex in examples}
    assert scrub.scan_failure(dataset) is None and len(failures(dataset)) == 1
    page = client.get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    assert "scan stopped" not in page and "took longer than" not in page
    assert [b for b in versions.blockers(dataset) if "scanned" in b] == []
    assert beat() == [] and sent == []


def test_a_rescan_stopped_by_a_slow_pattern_leaves_what_it_did_not_reach_unscanned(
    dataset,  # noqa: F811 - the fixture imported above
    curator,
    client_for,
    tmp_path,
    fast_limit,
    watchdog_beat,
    monkeypatch,
    django_capture_on_commit_callbacks,
):
    """A re-scan of a scanned and partly reviewed dataset (after a keep-pattern was added) stops at the
    slow message: the examples it did not reach were scanned only under the old settings, so they count
    as unscanned (freezing waits, with the reason) and keep their findings and decisions as they were."""
    examples = import_rows(dataset, curator, tmp_path)
    tasks.analyse_dataset(dataset.pk)
    assert statuses(dataset) == ["pending", "pending", "pending"]
    last = PiiFinding.objects.filter(example=examples[2], entity_type="EMAIL_ADDRESS").order_by("start")
    assert scrub.decide(dataset, [last[0].pk], True, curator) == 1  # one address scrubbed by the curator
    findings_before = sorted(
        PiiFinding.objects.filter(example__in=examples[1:]).values_list("pk", "start", "end", "decision")
    )
    before = messages_of(dataset)

    plant_keep_pattern(dataset, SLOW)
    client = client_for(curator)
    rescan_as(client, dataset, monkeypatch, django_capture_on_commit_callbacks)

    assert [f["reason"] for f in failures(dataset)] == ["slow_pattern"]
    assert statuses(dataset) == ["pending", "unscanned", "unscanned"]
    findings_after = sorted(
        PiiFinding.objects.filter(example__in=examples[1:]).values_list("pk", "start", "end", "decision")
    )
    assert findings_after == findings_before  # untouched: the stop came before their chunk's transaction
    assert messages_of(dataset) == before
    page = client.get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    assert escape(reason_for(SLOW)) in page
    assert not [leak for leak in LEAKS if leak in page]
    beat, sent = watchdog_beat
    assert beat() == [] and beat() == [] and sent == []


def test_a_legacy_keep_pattern_that_fails_todays_probe_stops_the_scan_before_anything_is_written(
    dataset,  # noqa: F811 - the fixture imported above
    curator,
    client_for,
    tmp_path,
    fast_limit,
    watchdog_beat,
):
    """A stored pattern the save-time probe would refuse now: the scanner refuses the settings at once
    (before any example), and that is a final, explained failure as well."""
    legacy = r"(x|xx)+y"
    plant_keep_pattern(dataset, legacy)
    import_rows(dataset, curator, tmp_path)
    before = messages_of(dataset)

    tasks.analyse_dataset(dataset.pk)

    (failure,) = failures(dataset)
    assert failure["reason"] == "invalid_policy" and failure["unscanned"] == 3
    assert statuses(dataset) == ["unscanned"] * 3
    assert not PiiFinding.objects.filter(dataset=dataset).exists() and messages_of(dataset) == before
    reason = scrub.scan_failure(dataset)
    assert reason.startswith("The PII settings were saved before a check they now fail, so the scan stopped;")
    assert f"'{legacy}': it takes too long on some texts" in reason and reason.endswith("then scan again.")
    page = client_for(curator).get(reverse("datasets:detail", args=[dataset.pk])).content.decode()
    assert escape(reason) in page
    assert not [leak for leak in LEAKS if leak in page]
    assert json.dumps(failure).find(SECRET) == -1
    beat, sent = watchdog_beat
    assert beat() == [] and sent == [] and len(failures(dataset)) == 1


@pytest.mark.parametrize("flags", [[], ["--scrub"]], ids=["scan-only", "scrub"])
def test_import_command_reports_the_stopped_scan_in_plain_words(fast_limit, roles, tmp_path, flags):
    """`import_dataset --keep-pattern` with a pattern that passes the save-time probe but is slow on a
    line: the import stays, the reason is printed; with --scrub (nothing can be applied) it exits non-zero."""
    from io import StringIO

    from django.core.management import CommandError, call_command

    path = write_jsonl(tmp_path / "cli.jsonl", ROWS)
    out, err = StringIO(), StringIO()
    args = [str(path), "--name", f"cli {flags}", "--keep-pattern", SLOW, *flags]
    if flags:
        with pytest.raises(CommandError, match="but the PII scan stopped: The keep-pattern"):
            call_command("import_dataset", *args, stdout=out, stderr=err)
    else:
        call_command("import_dataset", *args, stdout=out, stderr=err)
        assert "the PII scan stopped: " + reason_for(SLOW) in err.getvalue()
    ds = Dataset.objects.get(name=f"cli {flags}")
    assert ds.examples.count() == 3 and "Traceback" not in err.getvalue()
    assert not flags or not out.getvalue().strip()
    assert flags or out.getvalue().strip().splitlines()[-1] == str(ds.pk)
    assert all(leak not in out.getvalue() + err.getvalue() for leak in LEAKS)
