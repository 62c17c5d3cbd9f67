"""Real races on PostgreSQL in dataset curation: two curators (or a curator and a curation worker) writing
the same rows at the same moment. The method is tests/test_pg_races.py's, and its helpers are used here.

- accepting a PII finding vs rejecting it, vs rejecting another finding of the same example (the kept
  value's digest must survive the acceptance's rewrite of the example), vs marking its words by hand:
  one decision wins and the other sees it; the text is scrubbed once, at the right offsets;
- accepting every finding of a type vs rejecting one of them: each finding is decided once;
- accepting findings vs a re-scan of the same example: the findings of the example always point at the
  words they were made for in its current text (none from a scan of the text before the scrub);
- editing an example vs freezing the dataset: the version holds the old text, or the freeze is refused
  because the new text is not scanned yet; never new text that was never scanned, never a mix;
- two splits at once: the split of the later one, whole;
- keeping one of a duplicate group vs dropping its first member: "keep one" keeps the first member still
  active when it runs, never none;
- dropping an example vs accepting one of its findings; keeping one of a duplicate group vs an import
  into the same dataset (each holds a row lock the other wants, one of them after recording its audit
  event: the audit log's lock): both finish, every finding of a dropped example is scrubbed.

Every race runs in three orders (both released together, and each side first: it holds its locks,
waiting in a hook until the other is blocked on one of them or has finished), ITERATIONS times, each on a
fresh dataset; one test runs the three orders (rounds()), as the database's flush after each test costs
more than a race. None may deadlock or hang (`race` fails on DeadlockDetected, on a lock wait of its
lock_timeout and on a thread still running), and the audit chain must verify at the end. Only on
PostgreSQL: SQLite runs write transactions one at a time.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from functools import partial

import pytest
from conftest import make_version
from django.db import connection
from django.urls import reverse
from test_datasets import GOOD, import_file, write_jsonl
from test_pg_races import ORDERS, audit_verbs, hold, race, refused, verb_is
from test_review8_versions import content, curated_sft

from datasets_app import tasks
from datasets_app.models import Dataset, DatasetVersion, DuplicateGroup, Example, PiiFinding, Upload
from datasets_app.services import datasets, duplicates, imports, scrub, versions
from studio import audit
from studio.audit import verify_chain
from studio.models import AuditEvent
from studio.roles import CURATOR

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="needs PostgreSQL: SQLite runs write transactions one at a time, so nothing races",
    ),
]

ITERATIONS = 3  # each iteration imports (and mostly scans) a dataset of its own
REDACT, KEEP, PENDING = PiiFinding.Decision.REDACT, PiiFinding.Decision.KEEP, PiiFinding.Decision.PENDING

NAME, EMAIL = "Maria Gonzalez", "maria.gonzalez@example.com"
VALUES = {"PERSON": NAME, "EMAIL_ADDRESS": EMAIL}
# one example, four findings: a name then an e-mail address in each message (scrubbing the name moves
# the address's offsets)
PII_ROW = {
    "messages": [
        {"role": "user", "content": f"Hi, I am {NAME}, please write to {EMAIL} today."},
        {"role": "assistant", "content": f"Sure {NAME}, I wrote to {EMAIL}."},
    ]
}
COPY_ROW = {  # three of these form an exact duplicate group, each with a finding
    "messages": [
        {"role": "user", "content": f"Please write to {EMAIL} about my order."},
        {"role": "assistant", "content": "Done."},
    ]
}
CLEAN_ROW = GOOD[2]
SELECTION_SCRUBBED = "Part of that selection has already been scrubbed; select only the missed words."


@pytest.fixture
def second_curator(make_user):
    return make_user("cora", CURATOR)


@pytest.fixture(autouse=True)
def _no_scan_tasks(monkeypatch):
    """An edit queues a re-scan of its example when it commits (these tests commit): not sent anywhere."""
    monkeypatch.setattr(tasks.scan_examples, "delay", lambda *args, **kwargs: None)


def rounds() -> list[tuple[str, int]]:
    """The races of a test: in each order, ITERATIONS times (one test runs the three orders: each test
    case's flush of the database costs more than a race)."""
    return [(order, i) for order in ORDERS for i in range(ITERATIONS)]


def assert_outcomes(outcomes: dict[str, list[str]], *, first_leads: str, second_leads: str) -> None:
    """The side that held its locks first won every time (released together, either may win)."""
    assert outcomes["first-leads"] == [first_leads] * ITERATIONS, outcomes
    assert outcomes["second-leads"] == [second_leads] * ITERATIONS, outcomes
    assert len(outcomes["together"]) == ITERATIONS, outcomes


def scanned_dataset(curator, tmp_path, name: str, rows: list) -> Dataset:
    ds = datasets.create_dataset(name, "sft", curator)
    assert import_file(ds, write_jsonl(tmp_path / f"{name}.jsonl", rows), curator).imported == len(rows)
    scrub.scan_examples(ds)
    return ds


def finding(example: Example, entity_type: str, segment: int) -> PiiFinding:
    return PiiFinding.objects.get(example=example, entity_type=entity_type, segment=segment)


def last_event_id() -> int:
    return AuditEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


def events_since(event_id: int) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(id__gt=event_id).order_by("id"))


def assert_findings_consistent(example: Example) -> None:
    """Every finding of the example points at the words it was made for in the example's current text:
    a scrubbed one at its replacement, a pending or kept one at the raw value (never at a pseudonym, nor
    inside a scrubbed span); a kept value's digest is remembered; no span is found twice; the example's
    PII status agrees with its findings."""
    example.refresh_from_db()
    segments = example.segments()
    findings = list(example.findings.all())
    scrubbed = [(f.segment, f.start, f.end) for f in findings if f.decision == REDACT and f.replacement]
    for f in findings:
        words = segments[f.segment][f.start : f.end]
        if f.decision == REDACT:
            assert not f.replacement or words == f.replacement, (f, words)
            continue
        assert words == VALUES[f.entity_type], (f, f.decision, words)
        assert not any(s == f.segment and a < f.end and f.start < b for s, a, b in scrubbed), f
        if f.decision == KEEP:
            assert scrub.value_digest(f.entity_type, words) in example.kept_digests, f
    spans = [(f.segment, f.start, f.end, f.entity_type) for f in findings]
    assert len(set(spans)) == len(spans), spans
    assert example.pii_status == scrub._status(example.pk)


# =====================================================================================================
# PII decisions
# =====================================================================================================

DECISIONS = ("reject-same", "reject-other", "mark-same")


def test_accepting_a_finding_vs_another_decision_in_the_same_example(
    curator, second_curator, tmp_path, monkeypatch
):
    """Curator A accepts a finding while curator B rejects it (reject-same), rejects the e-mail address
    after the name A scrubs in the same message (reject-other: both apply, and the kept address's digest
    is not lost when the scrub rewrites the example), or marks the same words by hand (mark-same)."""
    outcomes = {other: defaultdict(list) for other in DECISIONS}
    for order, i in rounds():
        for other in DECISIONS:
            ds = scanned_dataset(curator, tmp_path, f"{other}-{order}-{i}", [PII_ROW])
            with monkeypatch.context() as mp:
                outcomes[other][order].append(accept_vs(other, order, ds, curator, second_curator, mp))
    assert outcomes["reject-other"] == {order: ["both"] * ITERATIONS for order in ORDERS}
    assert_outcomes(outcomes["reject-same"], first_leads="accept", second_leads="reject-same")
    assert_outcomes(outcomes["mark-same"], first_leads="accept", second_leads="mark-same")
    assert verify_chain().ok


def accept_vs(other: str, order: str, ds: Dataset, curator, second_curator, mp) -> str:
    """One race of test_accepting_a_finding_vs_another_decision_in_the_same_example: its outcome."""
    ex = Example.objects.get(dataset=ds)
    email = finding(ex, "EMAIL_ADDRESS", 0)
    accepted = finding(ex, "PERSON", 0) if other == "reject-other" else email
    accept = ("accept", partial(scrub.decide, ds, [accepted.pk], True, curator))
    if other == "mark-same":  # the words as B's page showed them
        mark = partial(scrub.mark_span, ex, 0, email.start, email.end, email.entity_type, second_curator)
        second = (other, mark)
    else:
        second = (other, partial(scrub.decide, ds, [email.pk], False, second_curator))
    since = last_event_id()
    if order == "first-leads":  # the acceptance holds its locks, about to scrub
        leading = hold(mp, scrub, "_apply_to_example", thread="accept")
        acceptor, decider = race(accept, second, second_waits_for=leading)
    elif order == "second-leads":
        if other == "mark-same":  # the mark holds its locks, its span inserted, about to scrub it
            leading = hold(mp, scrub, "redact", thread=other)
        else:  # the rejection holds its locks, the finding kept (uncommitted)
            leading = hold(mp, scrub, "value_digest", thread=other)
        acceptor, decider = race(accept, second, first_waits_for=leading)
    else:
        acceptor, decider = race(accept, second)
    assert acceptor.error is None, acceptor.error
    ex.refresh_from_db()
    text = ex.segments()[0]
    verbs = Counter(e.verb for e in events_since(since))
    kept_digest = scrub.value_digest("EMAIL_ADDRESS", EMAIL)
    if other == "reject-other":  # two findings: both decisions apply
        outcome = "both"
        assert decider.error is None and (acceptor.result, decider.result) == (1, 1)
        assert text == f"Hi, I am <PERSON_1>, please write to {EMAIL} today."
        email.refresh_from_db()
        assert email.decision == KEEP and text[email.start : email.end] == EMAIL
        assert ex.kept_digests == [kept_digest]
        assert verbs == {"pii.accept": 1, "pii.reject": 1}
    elif acceptor.result == 1:  # accepted first: the rejection or the mark found the words scrubbed
        outcome = "accept"
        if other == "mark-same":
            assert refused(decider, scrub.ScrubError), "the mark went through after the scrub"
            # the mark checked the page's words while the scrub was uncommitted, then its lock found the
            # text changed under it; released together, it may also start after the scrub has committed,
            # and then its first check finds those words scrubbed already (first-leads: always the former)
            refusals = [scrub.MARK_ON_CHANGED_TEXT]
            if order == "together":
                refusals.append(SELECTION_SCRUBBED)
            assert str(decider.error) in refusals, decider.error
        else:
            assert decider.error is None and decider.result == 0
        assert text == f"Hi, I am {NAME}, please write to <EMAIL_ADDRESS_1> today."
        email.refresh_from_db()
        assert email.decision == REDACT and ex.kept_digests == []
        assert verbs == {"pii.accept": 1}
    else:  # B's decision came first: the acceptance found nothing pending left to apply
        outcome = other
        assert acceptor.result == 0 and decider.error is None, decider.error
        if other == "mark-same":
            assert text == f"Hi, I am {NAME}, please write to <EMAIL_ADDRESS_1> today."
            assert decider.result.source == "curator" and decider.result.decision == REDACT
            assert not PiiFinding.objects.filter(pk=email.pk).exists()  # superseded by the mark
            assert verbs == {"pii.mark": 1} and audit_verbs(ex) == ["pii.mark"]
        else:
            assert decider.result == 1 and text == PII_ROW["messages"][0]["content"]
            email.refresh_from_db()
            assert email.decision == KEEP and ex.kept_digests == [kept_digest]
            assert verbs == {"pii.reject": 1}
    assert_findings_consistent(ex)
    return outcome


def test_accepting_every_finding_of_a_type_vs_rejecting_one_of_them(
    curator, second_curator, tmp_path, monkeypatch
):
    outcomes = defaultdict(list)
    for order, i in rounds():
        ds = scanned_dataset(curator, tmp_path, f"bulk-{order}-{i}", [PII_ROW, GOOD[0]])
        names = list(PiiFinding.objects.filter(dataset=ds, entity_type="PERSON"))
        target = names[-1]  # the last example's second name
        bulk = ("bulk", partial(scrub.decide_type, ds, "PERSON", True, curator))
        one = ("reject", partial(scrub.decide, ds, [target.pk], False, second_curator))
        since = last_event_id()
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the bulk acceptance holds its locks, about to scrub example 1
                first_example = lambda example, *args: example.position == 0  # noqa: E731
                leading = hold(mp, scrub, "_apply_to_example", thread="bulk", when=first_example)
                bulk_racer, one_racer = race(bulk, one, second_waits_for=leading)
            elif order == "second-leads":  # the rejection holds its locks, the finding kept (uncommitted)
                leading = hold(mp, scrub, "value_digest", thread="reject")
                bulk_racer, one_racer = race(bulk, one, first_waits_for=leading)
            else:
                bulk_racer, one_racer = race(bulk, one)
        assert bulk_racer.error is None and one_racer.error is None, (bulk_racer.error, one_racer.error)
        target.refresh_from_db()
        events = events_since(since)
        if one_racer.result == 1:  # rejected first: the bulk acceptance left it kept
            outcomes[order].append("reject")
            assert bulk_racer.result == len(names) - 1 and target.decision == KEEP
            assert [e.verb for e in events if e.verb == "pii.reject"] == ["pii.reject"]
        else:
            outcomes[order].append("bulk")
            assert (bulk_racer.result, one_racer.result) == (len(names), 0) and target.decision == REDACT
            assert not [e for e in events if e.verb == "pii.reject"]
        decisions = Counter(
            PiiFinding.objects.filter(dataset=ds, entity_type="PERSON").values_list("decision", flat=True)
        )
        assert decisions == Counter({REDACT: bulk_racer.result, KEEP: one_racer.result})
        (bulk_event,) = [e for e in events if e.verb == "pii.accept_type"]
        assert bulk_event.data == {"type": "PERSON", "findings": bulk_racer.result}
        for ex in Example.objects.filter(dataset=ds):
            assert_findings_consistent(ex)
    assert_outcomes(outcomes, first_leads="bulk", second_leads="reject")
    assert verify_chain().ok


def test_accepting_findings_vs_a_rescan_of_that_example(curator, tmp_path, monkeypatch):
    """A curator accepts the e-mail findings of an example while a curation worker re-scans it (a
    "Re-scan dataset", or an edit's re-scan). The scan reads the text, scans it, then replaces the
    example's pending findings: findings from the text before the scrub would point at the pseudonym."""
    outcomes = defaultdict(list)
    for order, i in rounds():
        ds = scanned_dataset(curator, tmp_path, f"rescan-{order}-{i}", [PII_ROW])
        ex = Example.objects.get(dataset=ds)
        emails = list(
            PiiFinding.objects.filter(example=ex, entity_type="EMAIL_ADDRESS").values_list("pk", flat=True)
        )
        accept = ("accept", partial(scrub.decide, ds, emails, True, curator))
        rescan = ("scan", partial(scrub.scan_examples, Dataset.objects.get(pk=ds.pk), [ex.pk]))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the acceptance holds its locks, about to scrub
                leading = hold(mp, scrub, "_apply_to_example", thread="accept")
                acceptor, scanner = race(accept, rescan, second_waits_for=leading)
            elif order == "second-leads":  # the scan holds the example, its new findings inserted
                leading = hold(mp, scrub, "_statuses", thread="scan")
                acceptor, scanner = race(accept, rescan, first_waits_for=leading)
            else:
                acceptor, scanner = race(accept, rescan)
        assert acceptor.error is None and scanner.error is None, (acceptor.error, scanner.error)
        ex.refresh_from_db()
        findings = Counter(ex.findings.values_list("entity_type", "decision"))
        if acceptor.result == 2:  # scrubbed first: the scan saw (or scanned again) the scrubbed text
            outcomes[order].append("accept")
            assert EMAIL not in str(ex.messages) and str(ex.messages).count("<EMAIL_ADDRESS_1>") == 2
            assert findings == {("EMAIL_ADDRESS", REDACT): 2, ("PERSON", PENDING): 2}
        else:  # re-scanned first: the findings accepted were replaced by the scan's, pending
            outcomes[order].append("scan")
            assert acceptor.result == 0 and ex.messages == PII_ROW["messages"]
            assert findings == {("EMAIL_ADDRESS", PENDING): 2, ("PERSON", PENDING): 2}
            assert not PiiFinding.objects.filter(pk__in=emails).exists()
        assert_findings_consistent(ex)
    assert_outcomes(outcomes, first_leads="accept", second_leads="scan")
    assert verify_chain().ok


# =====================================================================================================
# Editing, freezing, splitting
# =====================================================================================================


def test_editing_an_example_vs_freezing_the_dataset(curator, second_curator, tmp_path, monkeypatch):
    """The version holds the example's old text (frozen before the edit), or the freeze is refused
    because the edited text is not scanned yet; never the new, unscanned text, never a mix."""
    outcomes = defaultdict(list)
    for order, i in rounds():
        ds = curated_sft(curator, tmp_path, name=f"freeze-{order}-{i}")
        ex = Example.objects.filter(dataset=ds, dropped=False).order_by("position").first()
        old = content_of(ds)
        new_messages = [*ex.messages[:-1], {"role": "assistant", "content": f"A new answer {i}."}]
        edit = ("edit", partial(datasets.edit_example, ex, messages=new_messages, user=second_curator))
        freeze = ("freeze", partial(versions.freeze, Dataset.objects.get(pk=ds.pk), curator, "race"))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the edit holds the example, its text changed (uncommitted)
                leading = hold(mp, audit, "record", thread="edit", when=verb_is("example.edit"))
                editor, freezer = race(edit, freeze, second_waits_for=leading)
            elif order == "second-leads":  # the freeze has checked the dataset, about to copy its examples
                new_version = lambda version, *args, **kwargs: version.pk is None  # noqa: E731
                leading = hold(mp, DatasetVersion, "save", thread="freeze", when=new_version)
                editor, freezer = race(edit, freeze, first_waits_for=leading)
            else:
                editor, freezer = race(edit, freeze)
        assert editor.error is None, editor.error
        ex.refresh_from_db()
        assert ex.messages == new_messages and ex.pii_status == Example.Pii.UNSCANNED
        assert not ex.findings.exists()
        if refused(freezer, versions.FreezeRefused):  # edited first: the new text waits for its scan
            outcomes[order].append("refused")
            assert "1 examples have not been scanned for personal data yet" in str(freezer.error)
            assert not DatasetVersion.objects.filter(dataset=ds).exists()
        else:  # frozen first: the version holds the text as it was
            outcomes[order].append("old")
            version = freezer.result
            assert version.number == 1 and content(version) == old
            assert audit_verbs(version) == ["dataset.freeze"]
        assert audit_verbs(ex) == ["example.edit"]
    assert_outcomes(outcomes, first_leads="old", second_leads="refused")
    assert verify_chain().ok


def content_of(ds: Dataset) -> list[tuple]:
    """The active examples as a version would hold them (test_review8_versions.content's columns)."""
    return list(
        Example.objects.filter(dataset=ds, dropped=False)
        .order_by("position")
        .values_list("messages", "chosen", "rejected", "tags", "split")
    )


def splits_of(ds: Dataset) -> dict[int, str]:
    return dict(Example.objects.filter(dataset=ds).values_list("pk", "split"))


def test_two_splits_at_once(curator, second_curator, monkeypatch):
    """Two curators split the same dataset with other ratios and seeds: the examples end split as the
    later split says, all of them (as running that split again confirms), never a mix of the two."""
    winners = defaultdict(list)
    for order, i in rounds():
        ds = make_version(curator, name=f"split-{order}-{i}", train=80, eval_=40).dataset
        args = {"split-1": (1, 1, 1, 11 + i), "split-2": (8, 1, 1, 23 + i)}
        one = ("split-1", partial(versions.split_by_ratio, ds, *args["split-1"], curator))
        two = ("split-2", partial(versions.split_by_ratio, ds, *args["split-2"], second_curator))
        since = last_event_id()
        with monkeypatch.context() as mp:
            if order == "first-leads":  # split 1 holds every example it moved, about to record it
                leading = hold(mp, audit, "record", thread="split-1", when=verb_is("dataset.split"))
                racers = race(one, two, second_waits_for=leading)
            elif order == "second-leads":
                leading = hold(mp, audit, "record", thread="split-2", when=verb_is("dataset.split"))
                racers = race(one, two, first_waits_for=leading)
            else:
                racers = race(one, two)
        assert all(r.error is None for r in racers), [r.error for r in racers]
        events = [e for e in events_since(since) if e.verb == "dataset.split"]
        assert len(events) == 2
        winner = "split-1" if events[-1].actor_id == curator.pk else "split-2"
        winners[order].append(winner)
        counts = dict(Counter(splits_of(ds).values()))
        (result,) = [r.result for r in racers if r.name == winner]
        assert counts == {k: v for k, v in result.items() if v}
        final = splits_of(ds)
        versions.split_by_ratio(ds, *args[winner], curator)
        assert splits_of(ds) == final  # exactly the later split's assignment
    assert_outcomes(winners, first_leads="split-2", second_leads="split-1")
    assert verify_chain().ok


# =====================================================================================================
# Dropping examples: duplicate decisions, a drop, an import
# =====================================================================================================


def duplicate_dataset(curator, tmp_path, name: str) -> tuple[Dataset, DuplicateGroup, list[Example]]:
    """Three copies of one conversation with an e-mail address (one exact group, a pending finding in
    each) and one other conversation."""
    ds = scanned_dataset(curator, tmp_path, name, [COPY_ROW] * 3 + [CLEAN_ROW])
    assert duplicates.recompute(ds) == 1
    group = DuplicateGroup.objects.get(dataset=ds)
    members = list(group.members.order_by("position"))
    assert len(members) == 3 and all(m.pii_status == Example.Pii.PENDING for m in members)
    return ds, group, members


def assert_dropped_scrubbed(examples: list[Example]) -> None:
    """Dropped examples keep no raw personal data: every finding applied."""
    for ex in examples:
        ex.refresh_from_db()
        assert ex.dropped and EMAIL not in str(ex.messages)
        assert not ex.findings.exclude(decision=REDACT).exists()
        assert_findings_consistent(ex)


def test_keeping_one_of_a_duplicate_group_vs_dropping_its_first_member(
    curator, second_curator, client_for, tmp_path, monkeypatch
):
    """Curator A keeps one of a group (the first member still active) while curator B drops its first
    member on the example page: when the drop came first, "keep one" keeps the second member, so one
    stays; it never drops the rest next to a first member dropped meanwhile."""
    client = client_for(second_curator)
    outcomes = defaultdict(list)
    for order, i in rounds():
        ds, group, (first, second, third) = duplicate_dataset(curator, tmp_path, f"dups-{order}-{i}")
        keep_one = ("keep-one", partial(duplicates.decide, group, DuplicateGroup.Decision.KEEP_ONE, curator))
        url = reverse("datasets:example_drop", args=[first.pk])
        drop = ("drop", partial(client.post, url, {"drop": "1"}))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the decision holds the group's members, about to record it
                leading = hold(mp, audit, "record", thread="keep-one", when=verb_is("duplicates.keep_one"))
                decider, dropper = race(keep_one, drop, second_waits_for=leading)
            elif order == "second-leads":  # the drop holds the first member, dropped (uncommitted)
                leading = hold(mp, audit, "record", thread="drop", when=verb_is("example.drop"))
                decider, dropper = race(keep_one, drop, first_waits_for=leading)
            else:
                decider, dropper = race(keep_one, drop)
        assert decider.error is None and dropper.error is None, (decider.error, dropper.error)
        assert dropper.result.status_code == 302
        group.refresh_from_db()
        assert group.decision == DuplicateGroup.Decision.KEEP_ONE and group.decided_by == curator
        decided = AuditEvent.objects.get(verb="duplicates.keep_one", data__group=group.pk)
        dropped = AuditEvent.objects.get(verb="example.drop", object_id=str(first.pk))
        if dropped.pk < decided.pk:  # dropped first: the decision kept the second member
            outcomes[order].append("drop")
            assert decided.data["dropped"] == [third.pk] and decided.data["restored"] == []
            second.refresh_from_db()
            assert not second.dropped and second.findings.get().decision == PENDING
            assert_dropped_scrubbed([first, third])
        else:  # decided first: it kept the first member, which B then dropped
            outcomes[order].append("keep-one")
            assert decided.data["dropped"] == [second.pk, third.pk] and decided.data["restored"] == []
            assert_dropped_scrubbed([first, second, third])
    assert_outcomes(outcomes, first_leads="keep-one", second_leads="drop")
    assert verify_chain().ok


def test_dropping_an_example_vs_accepting_one_of_its_findings(
    curator, second_curator, client_for, tmp_path, monkeypatch
):
    """A drop scrubs every pending finding of the example (after recording the drop) while another
    curator accepts one of them: each holds a lock the other wants unless both take them in one order."""
    client = client_for(second_curator)
    outcomes = defaultdict(list)
    for order, i in rounds():
        ds = scanned_dataset(curator, tmp_path, f"drop-{order}-{i}", [PII_ROW])
        ex = Example.objects.get(dataset=ds)
        email = finding(ex, "EMAIL_ADDRESS", 0)
        accept = ("accept", partial(scrub.decide, ds, [email.pk], True, curator))
        drop = ("drop", partial(client.post, reverse("datasets:example_drop", args=[ex.pk]), {"drop": "1"}))
        since = last_event_id()
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the acceptance holds its locks, about to scrub
                leading = hold(mp, scrub, "_apply_to_example", thread="accept")
                acceptor, dropper = race(accept, drop, second_waits_for=leading)
            elif order == "second-leads":  # the drop holds the example, dropped (uncommitted)
                leading = hold(mp, audit, "record", thread="drop", when=verb_is("example.drop"))
                acceptor, dropper = race(accept, drop, first_waits_for=leading)
            else:
                acceptor, dropper = race(accept, drop)
        assert acceptor.error is None and dropper.error is None, (acceptor.error, dropper.error)
        assert dropper.result.status_code == 302
        applied = sorted(e.data["findings"] for e in events_since(since) if e.verb == "pii.accept")
        if acceptor.result == 1:  # accepted first: the drop scrubbed the three others
            outcomes[order].append("accept")
            assert applied == [1, 3]
        else:  # dropped first: the drop scrubbed all four, nothing was left to accept
            outcomes[order].append("drop")
            assert acceptor.result == 0 and applied == [4]
        assert audit_verbs(ex) == ["example.drop"]
        assert_dropped_scrubbed([ex])
        assert ex.findings.count() == 4
    assert_outcomes(outcomes, first_leads="accept", second_leads="drop")
    assert verify_chain().ok


def test_keeping_one_of_a_duplicate_group_vs_an_import_into_the_dataset(curator, tmp_path, monkeypatch):
    """A worker imports a second upload into the dataset (holding the dataset's row until it records the
    import) while a curator keeps one of a duplicate group (recording the decision, then scrubbing the
    members it dropped, which takes the dataset's row): both finish."""
    for order, i in rounds():
        ds, group, (first, second, third) = duplicate_dataset(curator, tmp_path, f"import-{order}-{i}")
        upload = imports.receive_path(ds, curator, write_jsonl(tmp_path / f"more-{order}-{i}.jsonl", GOOD))
        keep_one = ("keep-one", partial(duplicates.decide, group, DuplicateGroup.Decision.KEEP_ONE, curator))
        load = ("import", partial(imports.process, upload.pk))
        with monkeypatch.context() as mp:
            if order == "first-leads":  # the decision holds the group's members, about to record it
                leading = hold(mp, audit, "record", thread="keep-one", when=verb_is("duplicates.keep_one"))
                decider, importer = race(keep_one, load, second_waits_for=leading)
            elif order == "second-leads":  # the import holds the dataset, its examples inserted
                leading = hold(mp, audit, "record", thread="import", when=verb_is("dataset.import"))
                decider, importer = race(keep_one, load, first_waits_for=leading)
            else:
                decider, importer = race(keep_one, load)
        assert decider.error is None and importer.error is None, (decider.error, importer.error)
        assert importer.result.imported == len(GOOD)
        upload.refresh_from_db()
        assert upload.status == Upload.Status.IMPORTED and upload.imported_count == len(GOOD)
        assert Example.objects.filter(dataset=ds).count() == 4 + len(GOOD)
        decided = AuditEvent.objects.get(verb="duplicates.keep_one", data__group=group.pk)
        assert decided.data["dropped"] == [second.pk, third.pk]
        first.refresh_from_db()
        assert not first.dropped
        assert_dropped_scrubbed([second, third])
    assert verify_chain().ok
