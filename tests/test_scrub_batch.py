"""Accepting or rejecting a whole PII finding type in batches (a bounded number of queries per batch of
examples, not 6–7 per finding), with the results of applying the findings one at a time; and the scan
status poll (``scan_attempts`` / ``scan_failure``) answered with as few reads of the examples as the
answer needs, with the answers it always gave.

The datasets are built with the ORM directly (examples and PiiFinding rows): no scanner, no spaCy."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Max, Min
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from datasets_app.dedup import content_hash
from datasets_app.models import Dataset, Example, PiiFinding
from datasets_app.pii import PiiPolicy
from datasets_app.services import scrub
from datasets_app.services.imports import tags_text
from studio import audit
from studio.models import AuditEvent

pytestmark = pytest.mark.django_db
REDACT, KEEP, PENDING = PiiFinding.Decision.REDACT, PiiFinding.Decision.KEEP, PiiFinding.Decision.PENDING

MARIA, JOHN, AIKO = "Maria Gonzalez", "John Smith", "Aiko Tanaka"
MAIL, MAIL2 = "maria@example.com", "john.smith@example.org"

# (messages, chosen, rejected, tags, dropped, findings as (segment, words, type)); the same people and
# addresses in several examples (one pseudonym each across the dataset), a name spelt in lower case
# (normalised to the same person), a tag, a preference pair, a dropped example, a clean one
ROWS = [
    (
        [
            f"Hi, I am {MARIA}, please write to {MAIL} today. {JOHN} agrees.",
            f"Sure {MARIA}, I wrote to {MAIL}.",
        ],
        None,
        None,
        [AIKO],
        False,
        [(0, MARIA, "PERSON"), (0, MAIL, "EMAIL_ADDRESS"), (0, JOHN, "PERSON"), (1, MARIA, "PERSON")]
        + [(1, MAIL, "EMAIL_ADDRESS"), (2, AIKO, "PERSON")],
    ),
    (
        [f"{JOHN} here; {AIKO} and maria gonzalez too.", "Noted."],
        None,
        None,
        [],
        False,
        [(0, JOHN, "PERSON"), (0, AIKO, "PERSON"), (0, "maria gonzalez", "PERSON")],
    ),
    (
        [f"A question from {AIKO}."],
        f"Dear {AIKO}, reach {MAIL2} or {JOHN}.",
        f"No, {JOHN}.",
        [],
        False,
        [(0, AIKO, "PERSON"), (1, AIKO, "PERSON"), (1, MAIL2, "EMAIL_ADDRESS"), (1, JOHN, "PERSON")]
        + [(2, JOHN, "PERSON")],
    ),
    ([f"Dropped, but {JOHN} wrote it.", "Ok."], None, None, [], True, [(0, JOHN, "PERSON")]),
    (["Nothing personal here.", "Fine."], None, None, [], False, []),
    ([f"Only an address: {MAIL2}.", "Ok."], None, None, [], False, [(0, MAIL2, "EMAIL_ADDRESS")]),
]


def build(name: str, curator, rows=ROWS, operator: str = "pseudonym") -> Dataset:
    ds = Dataset.objects.create(
        name=name,
        kind="sft",
        owner=curator,
        pii_policy=PiiPolicy(operators={"PERSON": operator, "EMAIL_ADDRESS": operator}).to_dict(),
    )
    for position, (texts, chosen, rejected, tags, dropped, found) in enumerate(rows):
        roles = ["user", "assistant"]
        ex = Example.objects.create(
            dataset=ds,
            position=position,
            messages=[{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)],
            chosen=chosen,
            rejected=rejected,
            tags=tags,
            tags_text=tags_text(tags),
            dropped=dropped,
            content_hash="",
            pii_status=Example.Pii.PENDING if found else Example.Pii.CLEAN,
        )
        segments = ex.segments()
        for segment, words, entity_type in found:
            start = segments[segment].index(words)
            PiiFinding.objects.create(
                example=ex,
                dataset=ds,
                segment=segment,
                start=start,
                end=start + len(words),
                entity_type=entity_type,
                source="test",
            )
    return ds


def state(ds: Dataset) -> dict:
    """Everything a decision writes, in a form two twin datasets can be compared by."""
    ds.refresh_from_db()
    examples = [
        (
            ex.position,
            ex.messages,
            ex.chosen,
            ex.rejected,
            ex.tags,
            ex.tags_text,
            ex.content_hash,
            ex.minhash,
            ex.pii_status,
            ex.kept_digests,
        )
        for ex in Example.objects.filter(dataset=ds).order_by("position")
    ]
    findings = sorted(
        (
            f.example.position,
            f.segment,
            f.start,
            f.end,
            f.entity_type,
            f.decision,
            f.replacement,
            f.decided_by_id,
        )
        for f in PiiFinding.objects.filter(dataset=ds).select_related("example")
    )
    return {"examples": examples, "findings": findings, "pseudonyms": ds.pseudonym_map}


def one_at_a_time(ds: Dataset, entity_type: str, accept: bool, user) -> int:
    """The expectation: every pending finding of the type decided on its own (`decide` with one id), in
    reading order, each call reading the offsets the previous ones left."""
    pending = PiiFinding.objects.filter(dataset=ds, entity_type=entity_type, decision=PENDING)
    ids = list(pending.order_by("example__position", "segment", "start").values_list("pk", flat=True))
    return sum(scrub.decide(ds, [pk], accept, user) for pk in ids)


def events_since(event_id: int) -> list[tuple]:
    rows = AuditEvent.objects.filter(id__gt=event_id).order_by("id")
    return list(rows.values_list("verb", "object_type", "object_id", "data"))


def last_event_id() -> int:
    return AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


@pytest.mark.parametrize("operator", ["pseudonym", "mask", "hash", "redact"])
def test_accepting_a_type_gives_what_accepting_its_findings_one_by_one_gives(curator, operator):
    batched, single = (
        build("batched", curator, operator=operator),
        build("single", curator, operator=operator),
    )
    for ds in (batched, single):  # a value kept before: its digest must survive the rewrite of the example
        kept = PiiFinding.objects.get(dataset=ds, example__position=0, segment=1, entity_type="EMAIL_ADDRESS")
        assert scrub.decide(ds, [kept.pk], False, curator) == 1
    expected_n = one_at_a_time(single, "PERSON", True, curator)
    since = last_event_id()
    n = scrub.decide_type(batched, "PERSON", True, curator)
    assert n == expected_n == 12
    assert state(batched) == state(single)
    assert events_since(since) == [
        ("pii.accept_type", "dataset", str(batched.pk), {"type": "PERSON", "findings": 12})
    ]
    if operator == "pseudonym":  # one label per person across the dataset, numbered in reading order
        ex0, ex1 = Example.objects.filter(dataset=batched).order_by("position")[:2]
        assert (
            ex0.messages[0]["content"]
            == f"Hi, I am <PERSON_1>, please write to {MAIL} today. <PERSON_2> agrees."
        )
        assert ex0.tags == ["<PERSON_3>"] and ex0.tags_text == "|<PERSON_3>|"
        assert ex1.messages[0]["content"] == "<PERSON_2> here; <PERSON_3> and <PERSON_1> too."
    statuses = dict(Example.objects.filter(dataset=batched).values_list("position", "pii_status"))
    # pending: e-mail addresses still to decide (position 0's other one was kept); reviewed: all decided
    assert statuses == {0: "pending", 1: "reviewed", 2: "pending", 3: "reviewed", 4: "clean", 5: "pending"}


def test_rejecting_a_type_gives_what_rejecting_its_findings_one_by_one_gives(curator):
    batched, single = build("batched", curator), build("single", curator)
    for ds in (batched, single):  # a name scrubbed before: the example's text has moved under the others
        first = PiiFinding.objects.get(
            dataset=ds, example__position=0, segment=0, entity_type="PERSON", start=9
        )
        assert scrub.decide(ds, [first.pk], True, curator) == 1
    expected_n = one_at_a_time(single, "PERSON", False, curator)
    since = last_event_id()
    assert scrub.decide_type(batched, "PERSON", False, curator) == expected_n == 11
    assert state(batched) == state(single)
    assert events_since(since) == [
        ("pii.reject_type", "dataset", str(batched.pk), {"type": "PERSON", "findings": 11})
    ]
    ex = Example.objects.get(dataset=batched, position=1)
    assert len(ex.kept_digests) == 3 and ex.pii_status == Example.Pii.REVIEWED


def test_overlapping_findings_of_one_type_and_findings_inside_a_scrubbed_span(curator):
    """What one acceptance of several findings of an example does (the batch: no one-by-one twin), pinned:
    a finding inside an earlier one of the same batch is decided with it (no replacement of its own, its
    offsets those of the replacement its text went into); a finding of another type inside a scrubbed span is deleted; the findings
    after a scrubbed span keep pointing at their words, kept or pending."""
    text = f"Hi, I am {MARIA}, write to {MAIL}. Madrid agrees."
    rows = [([text, "Ok."], None, None, [], False, [(0, MARIA, "PERSON"), (0, "Gonzalez", "PERSON")])]
    ds = build("overlaps", curator, rows=rows)
    ex = Example.objects.get(dataset=ds)
    surname = PiiFinding.objects.get(example=ex, start=text.index("Gonzalez"), entity_type="PERSON")
    inside = PiiFinding.objects.create(
        example=ex, dataset=ds, segment=0, start=text.index("zalez"), end=text.index("zalez") + 5,
        entity_type="LOCATION", source="test",
    )  # fmt: skip
    mail = PiiFinding.objects.create(
        example=ex, dataset=ds, segment=0, start=text.index(MAIL), end=text.index(MAIL) + len(MAIL),
        entity_type="EMAIL_ADDRESS", source="test",
    )  # fmt: skip
    madrid = PiiFinding.objects.create(
        example=ex, dataset=ds, segment=0, start=text.index("Madrid"), end=text.index("Madrid") + 6,
        entity_type="LOCATION", source="test", decision=KEEP,
    )  # fmt: skip
    assert scrub.decide_type(ds, "PERSON", True, curator) == 2
    ex.refresh_from_db()
    scrubbed = ex.messages[0]["content"]
    assert scrubbed == f"Hi, I am <PERSON_1>, write to {MAIL}. Madrid agrees."
    full = PiiFinding.objects.get(example=ex, replacement="<PERSON_1>")
    assert (full.start, full.end, full.decision) == (9, 9 + len("<PERSON_1>"), REDACT)
    surname_now = PiiFinding.objects.get(pk=surname.pk)
    assert (surname_now.decision, surname_now.replacement) == (REDACT, "")
    assert (surname_now.start, surname_now.end) == (full.start, full.end)
    assert not PiiFinding.objects.filter(pk=inside.pk).exists()
    for finding, words, decision in ((mail, MAIL, PENDING), (madrid, "Madrid", KEEP)):
        finding.refresh_from_db()
        assert (scrubbed[finding.start : finding.end], finding.decision) == (words, decision)
    assert ex.pii_status == Example.Pii.PENDING and ex.minhash is None
    assert ex.content_hash == content_hash(ex.messages, ex.chosen, ex.rejected)


def spread(name: str, curator, examples: int) -> Dataset:
    """`examples` examples, each with two names (the same people throughout), an address after them and a
    place inside the second name: 2 × `examples` PERSON findings."""
    rows = []
    for i in range(examples):
        text = f"{i}: {MARIA} met {JOHN} at {MAIL}."
        rows.append(([text, "Ok."], None, None, [], False, [(0, MARIA, "PERSON"), (0, JOHN, "PERSON")]))
        rows[-1][5].extend([(0, MAIL, "EMAIL_ADDRESS"), (0, "Smith", "LOCATION")])
    return build(name, curator, rows=rows)


def queries_of(call) -> tuple[int, object]:
    with CaptureQueriesContext(connection) as queries:
        result = call()
    return len(queries), result


def test_the_queries_of_deciding_a_type_do_not_grow_with_its_findings(curator, monkeypatch):
    purges = []
    monkeypatch.setattr(scrub, "purge_freed_pages", lambda: purges.append(1))
    small, large = spread("small", curator, 5), spread("large", curator, 30)
    accept_small = queries_of(lambda: scrub.decide_type(small, "PERSON", True, curator))
    accept_large = queries_of(lambda: scrub.decide_type(large, "PERSON", True, curator))
    assert (accept_small[1], accept_large[1]) == (10, 60)
    assert accept_small[0] == accept_large[0], (accept_small, accept_large)
    assert accept_large[0] <= 25, accept_large
    assert purges == [1, 1]  # the freed pages are purged once per batch (one transaction)
    reject_small = queries_of(lambda: scrub.decide_type(small, "EMAIL_ADDRESS", False, curator))
    reject_large = queries_of(lambda: scrub.decide_type(large, "EMAIL_ADDRESS", False, curator))
    assert (reject_small[1], reject_large[1]) == (5, 30)
    assert reject_small[0] == reject_large[0] <= 25, (reject_small, reject_large)
    # every address still points at its words, after the names before it were scrubbed
    for f in PiiFinding.objects.filter(dataset=large, entity_type="EMAIL_ADDRESS").select_related("example"):
        assert f.example.messages[0]["content"][f.start : f.end] == MAIL and f.decision == KEEP
    assert not PiiFinding.objects.filter(dataset=large, entity_type="LOCATION").exists()


# --- scan attempts -------------------------------------------------------------------------------------


def reference_scan_attempts(dataset_id: int, before=None) -> tuple[int, dict | None]:
    """``scan_attempts`` as it was before it was made cheap (two aggregates, then the events since the
    oldest unscanned example): the oracle its answers are compared with."""
    unscanned = Example.objects.filter(dataset_id=dataset_id, pii_status=Example.Pii.UNSCANNED)
    span = unscanned.aggregate(oldest=Min("updated_at"))
    if before is not None:
        unscanned = unscanned.filter(updated_at__lt=before)
    span.update(unscanned.aggregate(newest=Max("updated_at")))
    if span["oldest"] is None or span["newest"] is None:
        return 0, None
    events = AuditEvent.objects.filter(
        object_type="dataset",
        object_id=str(dataset_id),
        verb__in=[scrub.SCAN_REQUEUE, scrub.SCAN_FAIL, scrub.SCAN_RESCAN],
        created_at__gte=span["oldest"],
    ).order_by("id")
    attempts, failure = 1, None
    for verb, at, data in events.values_list("verb", "created_at", "data"):
        if verb == scrub.SCAN_REQUEUE:
            attempts += 1
        else:
            attempts, failure = 1, ({**data, "at": at} if verb == scrub.SCAN_FAIL else None)
    if failure is not None and span["newest"] <= failure["at"]:
        return attempts, failure
    return attempts, None


T0 = timezone.now() - timedelta(hours=2)
# (unscanned examples' ages in minutes after T0, events as (verb, minutes after T0) in the order written)
SCENARIOS = {
    "all scanned": ([], []),
    "all scanned, old events": ([], [(scrub.SCAN_RESCAN, 1), (scrub.SCAN_FAIL, 2)]),
    "unscanned, no events": ([10, 20], []),
    "requeued twice": ([10, 20], [(scrub.SCAN_REQUEUE, 30), (scrub.SCAN_REQUEUE, 40)]),
    "failed": ([10, 20], [(scrub.SCAN_REQUEUE, 30), (scrub.SCAN_FAIL, 40)]),
    "failed, then new work": ([10, 50], [(scrub.SCAN_REQUEUE, 30), (scrub.SCAN_FAIL, 40)]),
    "failed, then re-scanned": ([10, 20], [(scrub.SCAN_FAIL, 40), (scrub.SCAN_RESCAN, 45)]),
    "requeued before the work": (
        [30, 40],
        [(scrub.SCAN_REQUEUE, 10), (scrub.SCAN_REQUEUE, 20), (scrub.SCAN_REQUEUE, 50)],
    ),
    "failed before the work": ([30, 40], [(scrub.SCAN_FAIL, 20), (scrub.SCAN_REQUEUE, 50)]),
    # clocks that went back: a re-scan written after a failure, with an older time
    "re-scan older than the failure before it": ([10, 20], [(scrub.SCAN_FAIL, 40), (scrub.SCAN_RESCAN, 35)]),
    "…and older than the work": ([37, 38], [(scrub.SCAN_FAIL, 40), (scrub.SCAN_RESCAN, 35)]),
    "failure older than the re-scan before it": ([10, 20], [(scrub.SCAN_RESCAN, 40), (scrub.SCAN_FAIL, 35)]),
}


def scenario(name: str, curator, monkeypatch) -> Dataset:
    ages, events = SCENARIOS[name]
    ds = Dataset.objects.create(name=name, kind="sft", owner=curator)
    for position in range(3):  # one scanned example, written first
        Example.objects.create(dataset=ds, position=position, messages=[], content_hash="")
    Example.objects.filter(dataset=ds).update(pii_status=Example.Pii.CLEAN, updated_at=T0)
    for position, minutes in enumerate(ages, start=1):
        Example.objects.filter(dataset=ds, position=position).update(
            pii_status=Example.Pii.UNSCANNED, updated_at=T0 + timedelta(minutes=minutes)
        )
    for verb, minutes in events:
        with monkeypatch.context() as mp:
            mp.setattr(audit.timezone, "now", lambda minutes=minutes: T0 + timedelta(minutes=minutes))
            audit.record(None, verb, ds, reason=scrub.SCAN_WORKER_LOST, attempts=3)
    return ds


@pytest.mark.parametrize("name", SCENARIOS)
def test_scan_attempts_and_failure_answer_as_before(name, curator, monkeypatch):
    ds = scenario(name, curator, monkeypatch)
    for minutes in (None, 0, 15, 25, 39, 45, 60):
        before = None if minutes is None else T0 + timedelta(minutes=minutes)
        assert scrub.scan_attempts(ds.pk, before) == reference_scan_attempts(ds.pk, before), (name, minutes)
    _attempts, failure = reference_scan_attempts(ds.pk)
    assert scrub.scan_failure(ds) == (scrub.failure_text(failure) if failure else None), name


def test_the_scan_status_poll_reads_no_examples_without_a_failure_that_could_count(curator, monkeypatch):
    """The poll (scan_failure) asks the audit log first, through its index: the examples (whose PII
    status has no index: each question reads the dataset's rows) only when a failure could be shown."""
    running = scenario("unscanned, no events", curator, monkeypatch)
    rescanned = scenario("failed, then re-scanned", curator, monkeypatch)
    failed = scenario("failed", curator, monkeypatch)
    for ds in (running, rescanned):
        with CaptureQueriesContext(connection) as queries:
            assert scrub.scan_failure(ds) is None
        assert len(queries) == 1 and "example" not in queries[0]["sql"].lower(), queries.captured_queries
    with CaptureQueriesContext(connection) as queries:
        assert scrub.scan_failure(failed) == scrub.failure_text(
            {"reason": scrub.SCAN_WORKER_LOST, "attempts": 3}
        )
    assert len(queries) == 2  # the events, then both ends of the unscanned examples' writes in one query
    # without events: whether any example waits, nothing more (exists(), not two aggregates)
    with CaptureQueriesContext(connection) as queries:
        assert scrub.scan_attempts(running.pk) == (1, None)
    assert len(queries) == 2 and "limit 1" in queries[1]["sql"].lower(), queries.captured_queries


@pytest.mark.parametrize("order", ["short first", "long first"])
def test_spans_that_start_together_or_overlap_are_scrubbed_whole(curator, order):
    """Two findings at one start ("Maria" and "Maria Gonzalez"): the longer one is replaced, whichever the
    database returns first (the shorter one first used to leave "<PERSON_1> Gonzalez"). A span that
    starts inside a replaced one and reaches past it is scrubbed to its end with that replacement."""
    text = "Call Maria Gonzalez today. Ask John Smith Street office."
    spans = [("Maria", "PERSON"), (MARIA, "PERSON")]
    spans = spans if order == "short first" else spans[::-1]
    rows = [([text, "Ok."], None, None, [], False, [(0, w, t) for w, t in spans] + [(0, JOHN, "PERSON")])]
    ds = build(f"together-{order}", curator, rows=rows)
    ex = Example.objects.get(dataset=ds)
    start = text.index("Smith Street")
    street = PiiFinding.objects.create(
        example=ex, dataset=ds, segment=0, start=start, end=start + len("Smith Street"),
        entity_type="PERSON", source="test",
    )  # fmt: skip
    kept = PiiFinding.objects.create(
        example=ex, dataset=ds, segment=0, start=text.index("office"), end=text.index("office") + 6,
        entity_type="LOCATION", source="test",
    )  # fmt: skip
    assert scrub.decide_type(ds, "PERSON", True, curator) == 4
    ex.refresh_from_db()
    scrubbed = ex.messages[0]["content"]
    assert scrubbed == "Call <PERSON_1> today. Ask <PERSON_2> office."
    assert "Maria" not in scrubbed and "Gonzalez" not in scrubbed and "Street" not in scrubbed
    findings = {f.pk: f for f in PiiFinding.objects.filter(example=ex)}
    for f in findings.values():
        if f.entity_type == "PERSON":
            assert f.decision == REDACT and scrubbed[f.start : f.end] in ("<PERSON_1>", "<PERSON_2>")
    assert findings[street.pk].replacement == ""
    assert scrubbed[findings[kept.pk].start : findings[kept.pk].end] == "office"  # moved with the text
