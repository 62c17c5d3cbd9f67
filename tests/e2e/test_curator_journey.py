"""The curator's journey in a real browser: sign in, create a dataset, upload a JSONL file with personal
data, watch the import, review the scanner's findings (accept, reject a false positive, mark a missed
name by selecting it), scrub the rest, freeze a version. Headless Chromium against the live server, a
real Celery worker on the "curation" queue, the configured database and broker (PostgreSQL + Redis in
CI). Screenshots of each step: docs/screenshots/curator-NN-*.png."""

from __future__ import annotations

import json
import re

import pytest
from conftest import wait_for
from django.urls import reverse
from playwright.sync_api import expect

from datasets_app.models import Dataset, DatasetVersion, Example, PiiFinding
from e2e.helpers import SELECT_WORD

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.django_db(transaction=True)]

NAME = "Zebulon Quartermaine"
EMAIL = "zq.canary.7731@example.org"
PHONE = "415-555-0199"
ORDER = "ORD-558812"  # a business identifier: kept by the default policy, never flagged
MISSED = "Zuzu"  # a nickname the scanner does not know: the curator marks it by hand
# A payment service named mid-sentence: the NER model tags it PERSON, the curator rejects it. ("Email" at
# the start of the same message is not flagged: sentence-initial common words are POS-checked.)
FALSE_POSITIVE = "Venmo"
WORKER_WAIT = 90  # seconds for the worker to import and scan (its start-up included)


def upload_lines() -> str:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Hello, my name is {NAME} and order {ORDER} never arrived."},
                {"role": "assistant", "content": f"I'm sorry, {NAME}. I can see {ORDER}; it left the depot."},
                {
                    "role": "user",
                    "content": f"Email me at {EMAIL} or call {PHONE}, I paid with {FALSE_POSITIVE}.",
                },
                {"role": "assistant", "content": "I will send the tracking details there."},
            ],
            "tags": ["shipping"],
        },
        {
            "messages": [
                {"role": "user", "content": f"My friends call me {MISSED}, put that on the parcel."},
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
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def finding_row(page, value: str):
    """The review table's row whose highlighted value is exactly `value`."""
    return page.locator("#pii-table tbody tr").filter(
        has=page.locator("mark", has_text=re.compile(rf"^{re.escape(value)}$"))
    )


def test_curator_uploads_reviews_and_freezes(page, shot, sign_in, curator, start_worker, tmp_path):
    worker = start_worker("curation")

    # 1. sign in
    sign_in(page, curator, before_submit=lambda: shot(page, "curator-01-sign-in"))

    # 2. a new dataset
    page.goto(reverse("datasets:create"))
    page.get_by_label("Name").fill("Support tickets")
    page.get_by_label("Description").fill("Shipping conversations from the help desk")
    shot(page, "curator-02-new-dataset")
    page.get_by_role("button", name="Create dataset").click()

    # 3. upload the file (a new dataset opens on its upload page), then watch the import's progress
    expect(page.locator("h1")).to_have_text("Upload a file")
    expect(page.locator(".breadcrumbs")).to_contain_text("Support tickets")
    dataset = Dataset.objects.get(name="Support tickets")
    path = tmp_path / "support-tickets.jsonl"
    path.write_text(upload_lines(), encoding="utf-8")
    page.locator("input[type=file]").set_input_files(str(path))
    shot(page, "curator-03-upload")
    page.get_by_role("button", name="Upload and validate").click()
    expect(page.locator("h1")).to_contain_text("support-tickets.jsonl")
    status = page.locator("#upload-status")
    if not status.get_by_text("examples imported").is_visible():
        expect(status.locator(".progress, [role=progressbar]").first).to_be_visible()
        shot(page, "curator-04-import-progress")
    expect(status.get_by_text("3 examples imported")).to_be_visible(timeout=WORKER_WAIT * 1000)
    shot(page, "curator-05-imported")

    # 4. the dataset page shows the scan, then the findings to review
    status.get_by_role("link", name="Go to the dataset").click()
    wait_for(
        lambda: (
            not Example.objects.filter(dataset=dataset, pii_status="unscanned").exists()
            and PiiFinding.objects.filter(dataset=dataset).exists()
        ),
        worker,
        timeout=WORKER_WAIT,
        what="the PII scan",
    )
    expect(page.locator("#scan-status .notice")).to_have_count(0, timeout=WORKER_WAIT * 1000)
    page.reload()
    pending = PiiFinding.objects.filter(dataset=dataset, decision="pending").count()
    to_review = page.locator(".stat", has_text="PII findings to review").locator(".stat-value")
    expect(to_review).to_have_text(str(pending))
    expect(page.locator(".stat", has_text="examples").first.locator(".stat-value")).to_have_text("3")
    shot(page, "curator-06-dataset-scanned")

    # 5. the review: name, e-mail, phone found; the order number and the nickname not
    page.get_by_role("link", name="Personal data", exact=True).click()
    expect(page.locator("h1")).to_contain_text("Personal-data review")
    table = page.locator("#pii-table")
    expect(finding_row(page, NAME)).to_have_count(2)
    for value in (EMAIL, PHONE, FALSE_POSITIVE):
        expect(finding_row(page, value)).to_have_count(1)
    expect(finding_row(page, "Email")).to_have_count(0)
    expect(table.locator("mark", has_text=ORDER)).to_have_count(0)
    expect(table.locator("mark", has_text=MISSED)).to_have_count(0)
    expect(table.locator("tbody tr")).to_have_count(pending)
    shot(page, "curator-07-review")

    # accept the e-mail address and the phone number (inline, without a page load)
    for value in (EMAIL, PHONE):
        row = page.locator("#" + finding_row(page, value).get_attribute("id"))
        row.get_by_role("button", name="Accept").click()
        expect(row).to_contain_text("Scrubbed")
        expect(row.locator("mark")).not_to_have_text(value)  # now shows its pseudonym
    # reject the false positive: "Venmo" is a payment service, not a person
    row = page.locator("#" + finding_row(page, FALSE_POSITIVE).get_attribute("id"))
    row.get_by_role("button", name="Reject").click()
    expect(row).to_contain_text("Kept (not PII)")
    expect(row.locator("mark")).to_have_text(FALSE_POSITIVE)
    shot(page, "curator-08-decided")

    # 6. mark the missed nickname: select it with the mouse in the example's conversation
    example = Example.objects.get(dataset=dataset, position=1)
    page.goto(reverse("datasets:example", args=[example.pk]))
    expect(page.locator("#mark-button")).to_be_disabled()
    page.evaluate(SELECT_WORD, MISSED)
    expect(page.locator("#mark-selection")).to_have_text(f"Selected: “{MISSED}”")
    page.locator("#mark-form select[name=entity_type]").select_option("PERSON")
    shot(page, "curator-09-mark-selection")
    page.locator("#mark-button").click()
    expect(page.get_by_text("Marked and scrubbed.")).to_be_visible()
    expect(page.locator("#conversation")).not_to_contain_text(MISSED)
    expect(page.locator("#conversation")).to_contain_text("My friends call me <PERSON_")
    shot(page, "curator-10-marked")

    # 7. scrub everything still pending, type by type
    page.goto(reverse("datasets:pii", args=[dataset.pk]))
    for _ in range(10):
        scrub_all = page.get_by_role("button", name="Scrub all")
        if scrub_all.count() == 0:
            break
        scrub_all.first.click()
        page.wait_for_load_state()
    expect(page.get_by_text("Nothing pending.")).to_be_visible()
    decided = page.locator("aside").get_by_text(re.compile(r"Scrubbed: \d+ · kept: 1"))
    expect(decided).to_be_visible()
    shot(page, "curator-11-all-decided")

    # 8. freeze a version and land on its page
    page.goto(reverse("datasets:detail", args=[dataset.pk]))
    expect(page.get_by_text("Ready: every example is scanned and every finding decided.")).to_be_visible()
    expect(to_review).to_have_text("0")
    page.get_by_label("Changelog").fill("First cut: personal data scrubbed, one false positive kept")
    shot(page, "curator-12-ready-to-freeze")
    page.get_by_role("button", name="Freeze version").click()
    expect(page.locator("h1")).to_contain_text("Version 1")
    expect(page.locator("h1")).to_contain_text("frozen")
    expect(page.locator(".stat", has_text="examples").first.locator(".stat-value")).to_have_text("3")
    body = page.locator("main")
    expect(body).to_contain_text("First cut: personal data scrubbed")
    expect(body).to_contain_text(ORDER)  # business identifiers survive
    for value in (NAME, EMAIL, PHONE, MISSED):
        expect(body).not_to_contain_text(value)
    first = page.locator("tr", has_text="never arrived").inner_text()
    labels = re.findall(r"<PERSON_\d+>", first)
    assert len(labels) == 2 and labels[0] == labels[1], first  # one person, one pseudonym
    shot(page, "curator-13-version")

    version = DatasetVersion.objects.get(dataset=dataset)
    assert page.url.endswith(version.get_absolute_url())
    assert page.js_errors == []
