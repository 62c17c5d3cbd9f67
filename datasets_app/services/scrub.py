"""PII scanning and scrubbing of a dataset's examples.

Scanning creates `PiiFinding` rows (spans into an example's segments; no copy of the text). A
finding the curator accepts is applied at once: the span is replaced in the example by a consistent
pseudonym (or a mask/hash/redaction, per the dataset's policy), so the database holds only scrubbed
text from then on. Rejecting a finding keeps the text. Remaining findings of the same segment have
their offsets shifted so they keep pointing at the same words.

Row locks: curation writes take their row locks in one order, and all of them before they record an
audit event (the audit log's lock is held until commit): the dataset's row where they take it (FOR NO KEY
UPDATE: a transaction inserting a finding, whose foreign key takes FOR KEY SHARE on it, does not wait),
then the examples (in position order), then their findings. Two curators, or a curator and a scan, then
wait for each other instead of each holding a row the other wants (a deadlock).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import NoReturn

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max, Min, Q
from django.utils import timezone

from studio import audit
from studio.db import purge_freed_pages, update_sql

from ..dedup import content_hash
from ..models import Dataset, Example, PiiFinding
from ..pii import ENTITY_TYPES, InvalidPolicy, PiiPolicy, PiiScanner, Pseudonymizer, SlowPattern
from . import progress

log = logging.getLogger(__name__)
Decision = PiiFinding.Decision


class ScrubError(Exception):
    pass


class ScanStopped(ScrubError):
    """A PII scan stopped for a reason in the dataset's own settings (a keep-pattern that runs out of
    time, settings that no longer pass validation). The failure is final: recorded as ``pii.scan.fail``
    (shown on the dataset page, never requeued by the watchdog) until the curator fixes the settings
    and scans again. ``str()`` is the plain reason."""


def pseudonym_secret() -> bytes:
    """HMAC key for pseudonym digests, derived from SECRET_KEY (never stored in the database)."""
    return hmac.new(settings.SECRET_KEY.encode(), b"studio-pseudonyms-v1", hashlib.sha256).digest()


def policy_for(dataset: Dataset) -> PiiPolicy:
    return PiiPolicy.from_dict(dataset.pii_policy or {})


def entity_types(policy: PiiPolicy) -> list[str]:
    """Every type a curator may mark: the built-in ones and the dataset's custom recognizers'."""
    custom = [c.entity_type for c in policy.custom_recognizers]
    return list(dict.fromkeys([*ENTITY_TYPES, *custom]))


# --- scanning ----------------------------------------------------------------------------------------


def scan_examples(
    dataset: Dataset,
    example_ids: Iterable[int] | None = None,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Scan examples (all of them by default, dropped ones too: see scrub_dropped); replaces their
    unapplied findings. Returns the number of findings created. Decisions to keep a value are
    remembered across re-scans.

    Each chunk of examples is scanned, then its findings and statuses are written in one transaction.
    When the dataset's settings stop the scan (see ``ScanStopped``: raised after recording it), the
    chunks written so far stay as they are (findings pending review, no text changed: dropped examples
    are scrubbed only after a complete scan), the examples not reached are left unscanned, so freezing
    waits for them, and the next scan takes them up."""
    qs = Example.objects.filter(dataset=dataset)
    if example_ids is not None:
        qs = qs.filter(pk__in=list(example_ids))
    ids = list(qs.order_by("position").values_list("pk", flat=True))
    try:
        scanner = PiiScanner(policy_for(dataset), processes=settings.STUDIO_CURATION_PROCESSES)
    except InvalidPolicy as exc:  # stored before a check existed (e.g. the backtracking probe)
        _stop_scan(dataset, ids, 0, reason=SCAN_INVALID_POLICY, problems=exc.problems)
    batch = settings.STUDIO_PII_BATCH
    created = 0
    for offset in range(0, len(ids), batch):
        chunk = ids[offset : offset + batch]
        try:
            created += _scan_chunk(dataset, scanner, chunk)
        except SlowPattern as exc:  # raised while scanning: the chunk's transaction wrote nothing
            _stop_scan(
                dataset, ids, offset, reason=SCAN_SLOW_PATTERN, pattern=exc.pattern, seconds=exc.seconds
            )
        if on_progress:
            on_progress(min(offset + batch, len(ids)), len(ids))
    log.info("dataset %s scanned examples=%s findings=%s", dataset.pk, len(ids), created)
    scrub_dropped(dataset, ids)
    return created


def _stop_scan(dataset: Dataset, ids: list[int], offset: int, *, reason: str, **data) -> NoReturn:
    """End a scan that cannot go on: ``ids[offset:]`` were not scanned (under the current settings: a
    re-scan's were scanned under the previous ones), so they are marked unscanned; the failure is
    recorded in the same transaction (audit ``pii.scan.fail``, which ends the scan's attempts: the
    watchdog does not requeue it); then ``ScanStopped`` is raised with the plain reason."""
    not_reached = ids[offset:]
    with transaction.atomic():
        for start in range(0, len(not_reached), 1000):
            Example.objects.filter(pk__in=not_reached[start : start + 1000]).exclude(
                pii_status=Example.Pii.UNSCANNED
            ).update(pii_status=Example.Pii.UNSCANNED)
        unscanned = Example.objects.filter(dataset=dataset, pii_status=Example.Pii.UNSCANNED).count()
        audit.record(None, SCAN_FAIL, dataset, reason=reason, unscanned=unscanned, **data)
    progress.clear_progress("scan", dataset.pk)
    log.warning(
        "dataset %s PII scan stopped (%s) in the chunk from example %s: scanned=%s not_reached=%s unscanned=%s",
        dataset.pk,
        reason,
        not_reached[0] if not_reached else None,
        offset,
        len(not_reached),
        unscanned,
    )
    raise ScanStopped(failure_text({"reason": reason, **data}))


def scrub_dropped(dataset: Dataset, example_ids: Iterable[int] | None = None, user=None) -> int:
    """Apply every pending finding of the dataset's dropped examples (or of those among
    ``example_ids``) without review. Dropped examples are never trained on nor listed for review, but
    they stay in the database, restorable: they keep no raw personal data either (a restored example
    comes back scrubbed; its findings show as applied)."""
    pending = PiiFinding.objects.filter(dataset=dataset, decision=Decision.PENDING, example__dropped=True)
    if example_ids is not None:
        pending = pending.filter(example_id__in=list(example_ids))
    total = 0
    while ids := list(pending.order_by("example_id").values_list("pk", flat=True)[:2000]):
        total += redact(dataset, list(PiiFinding.objects.filter(pk__in=ids)), user)
    if total:
        audit.record(
            user, "pii.accept", dataset, findings=total, note="dropped examples, applied without review"
        )
    return total


def _scan_chunk(dataset: Dataset, scanner: PiiScanner, ids: list[int]) -> int:
    examples = list(Example.objects.filter(pk__in=ids).order_by("position"))
    new, with_findings = _findings_of(dataset, scanner, examples)
    with transaction.atomic():
        # Lock the examples first: two scans of the same chunk (a requeued scan next to the original one)
        # then replace each other's pending findings one after the other instead of both inserting.
        now = {
            pk: (updated_at, kept)
            for pk, updated_at, kept in Example.objects.select_for_update()
            .filter(pk__in=ids)
            .order_by("position")
            .values_list("pk", "updated_at", "kept_digests")
        }
        # An example changed since it was read above (a finding scrubbed or an edit saved meanwhile: either
        # saves the row; a value kept: its digest) is scanned again as it is now: findings of the text
        # read before would point at other words (inside a pseudonym), or find a kept value again.
        stale = {ex.pk for ex in examples if now.get(ex.pk) != (ex.updated_at, ex.kept_digests)}
        if stale:
            fresh = list(Example.objects.filter(pk__in=stale).order_by("position"))
            again, again_with = _findings_of(dataset, scanner, fresh)
            new = [f for f in new if f.example_id not in stale] + again
            with_findings = (with_findings - stale) | again_with
            examples = [ex for ex in examples if ex.pk not in stale] + fresh
        PiiFinding.objects.filter(example_id__in=ids, decision=Decision.PENDING).delete()
        PiiFinding.objects.bulk_create(new)
        by_status: dict[str, list[int]] = defaultdict(list)
        for pk, status in _statuses([ex.pk for ex in examples], with_new=with_findings).items():
            by_status[status].append(pk)
        for status, pks in by_status.items():  # a few UPDATEs per chunk, not one per example
            Example.objects.filter(pk__in=pks).update(pii_status=status)
    return len(new)


def _findings_of(
    dataset: Dataset, scanner: PiiScanner, examples: list[Example]
) -> tuple[list[PiiFinding], set[int]]:
    """The scanner's findings in these examples (unsaved; values the curator kept left out) and the ids
    of the examples with any."""
    texts, owners = [], []
    for ex in examples:
        for seg, text in enumerate(ex.segments()):
            texts.append(text)
            owners.append((ex, seg))
    results = scanner.scan(texts)
    new: list[PiiFinding] = []
    with_findings: set[int] = set()
    for (ex, seg), findings in zip(owners, results, strict=True):
        for f in findings:
            if ex.kept_digests and value_digest(f.entity_type, f.text) in ex.kept_digests:
                continue
            new.append(
                PiiFinding(
                    example=ex,
                    dataset=dataset,
                    segment=seg,
                    start=f.start,
                    end=f.end,
                    entity_type=f.entity_type,
                    score=round(f.score, 3),
                    source=f.source[:60],
                )
            )
            with_findings.add(ex.pk)
    return new, with_findings


def value_digest(entity_type: str, value: str) -> str:
    return hmac.new(pseudonym_secret(), f"{entity_type}\x00{value}".encode(), hashlib.sha256).hexdigest()


def _status(example_id: int) -> str:
    return _statuses([example_id])[example_id]


def _statuses(example_ids: list[int], with_new: Iterable[int] = ()) -> dict[int, str]:
    """The PII status of each example from its findings (one query): pending while a finding waits
    for a decision (or the example is in ``with_new``), reviewed when all are decided, else clean."""
    decided: set[int] = set()
    pending = set(with_new)
    rows = (
        PiiFinding.objects.filter(example_id__in=example_ids).order_by().values_list("example_id", "decision")
    )
    for example_id, decision in rows.distinct():
        (pending if decision == Decision.PENDING else decided).add(example_id)
    statuses = {}
    for pk in example_ids:
        if pk in pending:
            statuses[pk] = Example.Pii.PENDING
        elif pk in decided:
            statuses[pk] = Example.Pii.REVIEWED
        else:
            statuses[pk] = Example.Pii.CLEAN
    return statuses


# --- applying -----------------------------------------------------------------------------------------

# What scrubbing changes in an example's row (`save()` used to write the whole row, read under its lock).
_SCRUBBED_FIELDS = [
    "messages",
    "chosen",
    "rejected",
    "tags",
    "tags_text",
    "content_hash",
    "minhash",
    "updated_at",
    "pii_status",
]


def _update_rows(model, objs: list, fields: list[str]) -> None:
    """Write `fields` of each object to its row with one executemany: one UPDATE statement, prepared
    once, whatever the number of rows (accepting a whole finding type used to save row by row, 6–7
    queries per finding; Django's bulk_update builds a CASE expression per row and field, which costs
    more in Python than the row-by-row saves did). Values are converted as the ORM's own saves do."""
    if not objs:
        return
    columns = [model._meta.get_field(name) for name in fields]
    sql = update_sql(connection, model._meta.db_table, [f.column for f in columns], model._meta.pk.column)
    rows = [
        [field.get_db_prep_save(getattr(obj, field.attname), connection) for field in columns] + [obj.pk]
        for obj in objs
    ]
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def _apply_to_example(
    example: Example,
    to_redact: list[PiiFinding],
    others: list[PiiFinding],
    pseudo: Pseudonymizer,
    policy: PiiPolicy,
    user,
) -> tuple[list[PiiFinding], list[PiiFinding]]:
    """Replace the spans of `to_redact` in the example and shift the offsets of `others` (the example's
    other findings), in memory: the caller writes them. Returns (others moved, others to delete: inside a
    scrubbed span). The example's PII status is set from its findings as they are then."""
    segments = example.segments()
    by_segment: dict[int, list[PiiFinding]] = defaultdict(list)
    for f in to_redact:
        by_segment[f.segment].append(f)
    moved: list[PiiFinding] = []
    gone: list[PiiFinding] = []
    now = timezone.now()
    for seg, findings in by_segment.items():
        text = segments[seg]
        # at one start the longest span first: "Maria Gonzalez" before "Maria", so the name goes whole
        findings.sort(key=lambda f: (f.start, -f.end))
        out, cursor, shifts = [], 0, []  # shifts: (original start, original end, delta so far)
        delta = 0
        covering: PiiFinding | None = None  # the last span replaced
        for f in findings:
            if f.start < cursor:  # overlaps the span replaced before it: scrubbed with it
                if f.end > cursor:  # and reaches past it: that replacement covers the rest too
                    delta -= f.end - cursor
                    shifts[-1] = (shifts[-1][0], f.end, delta)
                    cursor = f.end
                f.start, f.end = covering.start, covering.end  # where its text went
                f.replacement = ""
                f.decision, f.decided_by, f.decided_at = Decision.REDACT, user, now
                continue
            value = text[f.start : f.end]
            operator = policy.operators.get(f.entity_type, "pseudonym")
            replacement = pseudo.replacement(f.entity_type, value, operator)
            out.append(text[cursor : f.start])
            out.append(replacement)
            cursor = f.end
            delta += len(replacement) - (f.end - f.start)
            shifts.append((f.start, f.end, delta))
            new_start = f.start + (delta - (len(replacement) - (f.end - f.start)))
            f.start, f.end = new_start, new_start + len(replacement)
            f.replacement = replacement[:100]
            f.decision, f.decided_by, f.decided_at = Decision.REDACT, user, now
            covering = f
        out.append(text[cursor:])
        segments[seg] = "".join(out)
        for other in others:
            if other.segment != seg:
                continue
            applied = [d for (s, e, d) in shifts if e <= other.start]
            if any(s < other.end and other.start < e for (s, e, _) in shifts):
                # the span was inside a redacted one: nothing left to decide
                gone.append(other)
                continue
            move = applied[-1] if applied else 0
            if move:
                other.start += move
                other.end += move
                moved.append(other)
    example.set_segments(segments)
    example.content_hash = content_hash(example.messages, example.chosen, example.rejected)
    example.minhash = None
    example.updated_at = timezone.now()  # what save() set (auto_now)
    deleted = {f.pk for f in gone}
    if any(f.decision == Decision.PENDING and f.pk not in deleted for f in others):
        example.pii_status = Example.Pii.PENDING
    else:  # its findings just scrubbed are decided, whatever else is left
        example.pii_status = Example.Pii.REVIEWED
    return moved, gone


def redact(dataset: Dataset, findings: Iterable[PiiFinding], user) -> int:
    """Accept findings: scrub their spans now. Returns how many were applied.

    A bounded number of queries whatever the number of findings: the rows are locked and read in a few
    queries, the replacements computed in memory, then written with bulk updates."""
    ids = [f.pk for f in findings if f.decision == Decision.PENDING]
    if not ids:
        return 0
    with transaction.atomic():
        # the dataset, the examples, then the findings (see the module's docstring)
        locked = Dataset.objects.select_for_update(no_key=True).get(pk=dataset.pk)
        examples = _lock_examples(PiiFinding.objects.filter(pk__in=ids).values_list("example_id", flat=True))
        # The rows as they are now, not as the caller read them: a finding another curator (or a double
        # submit) decided meanwhile is not applied again, and offsets shifted by a redaction since then
        # are the ones used. Applying stale offsets would cut into the pseudonym and the text after it.
        # The examples too: their text is rewritten from the rows read here, under their locks.
        findings = list(PiiFinding.objects.select_for_update().filter(pk__in=ids, decision=Decision.PENDING))
        if not findings:
            return 0
        by_example: dict[int, list[PiiFinding]] = defaultdict(list)
        for f in findings:
            by_example[f.example_id].append(f)
        examples = [ex for ex in examples if ex.pk in by_example]
        # the examples' other findings (any decision), read once for all of them: their offsets move
        # (locked with their examples: every writer of a finding locks its example first)
        applied = {f.pk for f in findings}
        others: dict[int, list[PiiFinding]] = defaultdict(list)
        for other in PiiFinding.objects.filter(example_id__in=list(by_example)):
            if other.pk not in applied:
                others[other.example_id].append(other)
        policy = policy_for(locked)
        pseudo = Pseudonymizer(pseudonym_secret(), dict(locked.pseudonym_map or {}))
        moved: list[PiiFinding] = []
        gone: list[PiiFinding] = []
        for ex in examples:  # in position order: pseudonyms are numbered in reading order
            ex_moved, ex_gone = _apply_to_example(ex, by_example[ex.pk], others[ex.pk], pseudo, policy, user)
            moved += ex_moved
            gone += ex_gone
        _update_rows(Example, examples, _SCRUBBED_FIELDS)
        _update_rows(
            PiiFinding, findings, ["start", "end", "replacement", "decision", "decided_by", "decided_at"]
        )
        _update_rows(PiiFinding, moved, ["start", "end"])
        if gone:
            PiiFinding.objects.filter(pk__in=[f.pk for f in gone]).delete()
        Dataset.objects.filter(pk=locked.pk).update(pseudonym_map=pseudo.mapping)
        purge_freed_pages()
    return len(findings)


def _lock_examples(example_ids: Iterable[int]) -> list[Example]:
    """The examples, row-locked in position order and read as they are now (in a transaction)."""
    return list(Example.objects.select_for_update().filter(pk__in=set(example_ids)).order_by("position"))


def keep(findings: Iterable[PiiFinding], user) -> int:
    ids = [f.pk for f in findings if f.decision == Decision.PENDING]
    if not ids:
        return 0
    with transaction.atomic():
        # the examples before their findings (see the module's docstring), read as they are now: the
        # digests of values kept meanwhile (another curator) are added to, not overwritten
        examples = _lock_examples(PiiFinding.objects.filter(pk__in=ids).values_list("example_id", flat=True))
        # only findings still pending now: one scrubbed meanwhile (another curator) stays scrubbed
        rows = list(PiiFinding.objects.select_for_update().filter(pk__in=ids, decision=Decision.PENDING))
        ids = [f.pk for f in rows]
        if not ids:
            return 0
        by_example: dict[int, list[PiiFinding]] = defaultdict(list)
        for f in rows:
            by_example[f.example_id].append(f)
        PiiFinding.objects.filter(pk__in=ids).update(
            decision=Decision.KEEP, decided_by=user, decided_at=timezone.now()
        )
        examples = [ex for ex in examples if ex.pk in by_example]
        for ex in examples:
            segments = ex.segments()
            digests = set(ex.kept_digests or [])
            digests.update(
                value_digest(f.entity_type, segments[f.segment][f.start : f.end]) for f in by_example[ex.pk]
            )
            ex.kept_digests = sorted(digests)
        statuses = _statuses([ex.pk for ex in examples])  # one query, after the findings were kept
        for ex in examples:
            ex.pii_status = statuses[ex.pk]
        _update_rows(Example, examples, ["kept_digests", "pii_status"])  # updated_at unchanged, as before
    return len(ids)


def decide(dataset: Dataset, finding_ids: list[int], accept: bool, user, *, note: str = "") -> int:
    findings = list(PiiFinding.objects.filter(dataset=dataset, pk__in=finding_ids))
    n = redact(dataset, findings, user) if accept else keep(findings, user)
    if n:
        verb = "pii.accept" if accept else "pii.reject"
        types = sorted({f.entity_type for f in findings})
        audit.record(user, verb, dataset, findings=n, types=types, note=note)
    return n


def decide_type(dataset: Dataset, entity_type: str, accept: bool, user) -> int:
    """Bulk accept or reject every pending finding of one type, in chunks. Dropped examples are
    included on purpose: they are not reviewed, but they stay in the database, and scrubbing them too
    leaves no raw personal data behind (``import_dataset --scrub`` relies on it)."""
    total = 0
    while True:
        ids = list(
            PiiFinding.objects.filter(dataset=dataset, entity_type=entity_type, decision=Decision.PENDING)
            .order_by("example_id")
            .values_list("pk", flat=True)[:2000]
        )
        if not ids:
            break
        findings = list(PiiFinding.objects.filter(pk__in=ids))
        total += redact(dataset, findings, user) if accept else keep(findings, user)
    if total:
        audit.record(
            user,
            "pii.accept_type" if accept else "pii.reject_type",
            dataset,
            type=entity_type,
            findings=total,
        )
    return total


def apply_all(dataset: Dataset, user) -> int:
    """`--scrub`: accept every pending finding of the dataset without review."""
    total = 0
    for entity_type in pending_types(dataset):
        total += decide_type(dataset, entity_type, True, user)
    return total


def pending_types(dataset: Dataset) -> list[str]:
    return sorted(
        set(
            PiiFinding.objects.filter(dataset=dataset, decision=Decision.PENDING).values_list(
                "entity_type", flat=True
            )
        )
    )


MARK_ON_CHANGED_TEXT = (
    "This example was changed since you opened it (another curator, or a finding scrubbed meanwhile); "
    "nothing was marked. Select the words again in its current text."
)


def mark_span(example: Example, segment: int, start: int, end: int, entity_type: str, user) -> PiiFinding:
    """A curator marks a span the scanner missed; it is scrubbed at once."""
    segments = example.segments()
    if not 0 <= segment < len(segments):
        raise ScrubError("That message no longer exists; reload the page.")
    text = segments[segment]
    if not (0 <= start < end <= len(text)) or not text[start:end].strip():
        raise ScrubError("Select the words to scrub inside one message, then choose their type.")
    if entity_type not in entity_types(policy_for(example.dataset)):
        raise ScrubError(f"Unknown entity type {entity_type!r}.")
    overlapping = PiiFinding.objects.filter(
        example=example, segment=segment, start__lt=end, end__gt=start, decision=Decision.REDACT
    )
    if overlapping.exists():
        raise ScrubError("Part of that selection has already been scrubbed; select only the missed words.")
    with transaction.atomic():
        # the dataset, then the example, before its findings (see the module's docstring); the example as
        # it is now: the offsets count characters of the text the page showed, and after a scrub or an
        # edit since then they point at other words, which would be scrubbed instead of the selected ones
        Dataset.objects.select_for_update(no_key=True).get(pk=example.dataset_id)
        if Example.objects.select_for_update().get(pk=example.pk).segments() != segments:
            raise ScrubError(MARK_ON_CHANGED_TEXT)
        # pending findings inside the selection are superseded by the curator's span
        PiiFinding.objects.filter(
            example=example, segment=segment, start__lt=end, end__gt=start, decision=Decision.PENDING
        ).delete()
        finding = PiiFinding.objects.create(
            example=example,
            dataset=example.dataset,
            segment=segment,
            start=start,
            end=end,
            entity_type=entity_type,
            score=1.0,
            source="curator",
        )
        redact(example.dataset, [finding], user)
        audit.record(user, "pii.mark", example, type=entity_type, segment=segment)
    finding.refresh_from_db()
    return finding


def finding_context(finding: PiiFinding, example: Example, width: int = 60) -> dict:
    """The finding's words with some text either side, for the review list."""
    text = example.segments()[finding.segment] if finding.segment < len(example.segments()) else ""
    before = text[max(0, finding.start - width) : finding.start]
    after = text[finding.end : finding.end + width]
    return {
        "before": ("…" if finding.start > width else "") + before,
        "value": text[finding.start : finding.end],
        "after": after + ("…" if finding.end + width < len(text) else ""),
        "role": example.segment_label(finding.segment),
    }


def scan_progress_callback(dataset_id: int):
    def cb(done: int, total: int) -> None:
        progress.set_progress("scan", dataset_id, "Scanning for personal data", done, total)

    return cb


SCAN_STALE_AFTER = timedelta(minutes=3)
SCAN_REQUEUE, SCAN_FAIL, SCAN_RESCAN = "pii.scan.requeue", "pii.scan.fail", "pii.rescan"
# reasons of a pii.scan.fail event
SCAN_WORKER_LOST, SCAN_SLOW_PATTERN, SCAN_INVALID_POLICY = "worker_lost", "slow_pattern", "invalid_policy"


def scan_attempts(dataset_id: int, before=None) -> tuple[int, dict | None]:
    """(attempts, failure event data or None) of the dataset's current PII scan, from its audit events
    since the oldest unscanned example was written: the first attempt plus one per watchdog requeue. A
    curator's re-scan starts the count afresh; so does new work: unscanned examples written after the scan
    failed (with `before`, only those written before it count: a fresh edit's own re-scan is on its way)."""
    return _scan_attempts(dataset_id, before, _scan_events(dataset_id))


def _scan_events(dataset_id: int) -> list[tuple[str, object, dict]]:
    """(verb, created_at, data) of the dataset's scan events (requeues, failures, re-scans), oldest first:
    a few rows, found through the audit log's object_id index."""
    from studio.models import AuditEvent

    events = AuditEvent.objects.filter(
        object_type="dataset", object_id=str(dataset_id), verb__in=[SCAN_REQUEUE, SCAN_FAIL, SCAN_RESCAN]
    )
    return list(events.order_by("id").values_list("verb", "created_at", "data"))


def _scan_attempts(
    dataset_id: int, before, events: list[tuple[str, object, dict]]
) -> tuple[int, dict | None]:
    # pii_status and updated_at have no index (every index slows the bulk import): each question about
    # the unscanned examples reads the dataset's rows, so ask as few as the answer needs
    unscanned = Example.objects.filter(dataset_id=dataset_id, pii_status=Example.Pii.UNSCANNED)
    waiting = unscanned.filter(updated_at__lt=before) if before is not None else unscanned
    if not events:  # one attempt if the scan has work (exists() stops at the first unscanned row)
        return (1, None) if waiting.exists() else (0, None)
    # both ends of the unscanned examples' writes in one pass (newest: of those written before `before`)
    span = unscanned.aggregate(
        oldest=Min("updated_at"),
        newest=Max("updated_at", filter=Q(updated_at__lt=before))
        if before is not None
        else Max("updated_at"),
    )
    if span["oldest"] is None or span["newest"] is None:
        return 0, None
    attempts, failure = 1, None
    for verb, at, data in events:
        if at < span["oldest"]:  # before the work now waiting was written: another scan's
            continue
        if verb == SCAN_REQUEUE:
            attempts += 1
        else:  # a re-scan, or the failure that ended the previous scan: what follows is a new scan
            attempts, failure = 1, ({**data, "at": at} if verb == SCAN_FAIL else None)
    if failure is not None and span["newest"] <= failure["at"]:
        return attempts, failure
    return attempts, None


def _failure_possible(events: list[tuple[str, object, dict]]) -> bool:
    """Whether a ``pii.scan.fail`` among the events could be the failure ``scan_attempts`` reports: one
    not followed (in id order) by a re-scan or failure written at the same time or later. Whenever such
    a failure counts (written since the oldest unscanned example), so does the event after it, which
    starts a new scan (or is the failure reported)."""
    latest_after = None  # the latest time of the re-scans and failures after the one looked at
    for verb, at, _data in reversed(events):
        if verb == SCAN_REQUEUE:
            continue
        if verb == SCAN_FAIL and (latest_after is None or latest_after < at):
            return True
        latest_after = at if latest_after is None else max(latest_after, at)
    return False


def scan_failure(dataset: Dataset) -> str | None:
    """The plain reason the dataset's PII scan was given up (shown with the scan status and where
    freezing is blocked), or None. Polled while a scan runs: without a failure that could count, the
    answer is None whatever the examples, and they are not read."""
    events = _scan_events(dataset.pk)
    if not _failure_possible(events):
        return None
    _attempts, failure = _scan_attempts(dataset.pk, None, events)
    if failure is None:
        return None
    return failure_text(failure)


def failure_text(failure: dict) -> str:
    """Plain words for a ``pii.scan.fail`` event's data: what happened and what to do. Quotes the
    curator's own settings (a keep-pattern), never message text."""
    reason = failure.get("reason")
    if reason == SCAN_SLOW_PATTERN:
        pattern = _shorten(str(failure.get("pattern") or ""))
        seconds = float(failure.get("seconds") or 0)
        return (
            f"The keep-pattern '{pattern}' took longer than {seconds:g} second{'' if seconds == 1 else 's'} "
            "on one message, so the scan stopped; nothing was changed. Simplify the pattern (avoid nested "
            "repetition such as (a+)+) or remove it in the PII settings, then scan again."
        )
    if reason == SCAN_INVALID_POLICY:
        problems = "; ".join(_shorten(str(p), 400) for p in failure.get("problems") or [])
        return (
            "The PII settings were saved before a check they now fail, so the scan stopped; nothing was "
            f"changed. The problem: {problems}. Fix it in the PII settings, then scan again."
        )
    return (
        f"The personal-data scan was given up after its worker stopped {failure.get('attempts')} times "
        "without finishing (killed, e.g. out of memory on an unusual upload). Remove the suspicious examples "
        "or give the curation workers more memory, then press “Re-scan dataset” on the PII review page."
    )


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def requeue_stale_scans() -> list[int]:
    """Datasets whose PII scan stopped (its worker was killed): examples still unscanned and unchanged
    for SCAN_STALE_AFTER (an edit's own re-scan is younger), no import under way, no scan progress in
    that time. Queues the analysis again for each (it scans only
    the unscanned examples, and a chunk's findings are replaced, never added twice), up to
    STUDIO_JOB_MAX_ATTEMPTS attempts in all: then the scan is failed with a reason (audit event
    pii.scan.fail, shown on the dataset page) and never queued again until a curator re-scans. A scan that
    stopped on the dataset's own settings (``ScanStopped``) recorded its pii.scan.fail itself: it is
    final at once, as retrying would stop the same way."""
    from ..models import Upload
    from ..tasks import analyse_dataset

    cutoff = timezone.now() - SCAN_STALE_AFTER
    busy = Upload.objects.filter(status__in=[Upload.Status.QUEUED, Upload.Status.PROCESSING])
    candidates = (
        Example.objects.filter(pii_status=Example.Pii.UNSCANNED, updated_at__lt=cutoff)
        .exclude(dataset_id__in=busy.values("dataset_id"))
        .values_list("dataset_id", flat=True)
        .distinct()
    )
    requeued, failed = [], []
    for dataset_id in sorted(set(candidates)):
        live = progress.get_progress("scan", dataset_id)
        if live and live.get("at", 0) > cutoff.timestamp():
            continue
        attempts, failure = scan_attempts(dataset_id, before=cutoff)
        if failure is not None:
            continue
        dataset = Dataset.objects.get(pk=dataset_id)
        if attempts >= settings.STUDIO_JOB_MAX_ATTEMPTS:
            unscanned = Example.objects.filter(
                dataset_id=dataset_id, pii_status=Example.Pii.UNSCANNED
            ).count()
            audit.record(
                None, SCAN_FAIL, dataset, reason=SCAN_WORKER_LOST, attempts=attempts, unscanned=unscanned
            )
            progress.clear_progress("scan", dataset_id)
            failed.append(dataset_id)
            continue
        audit.record(None, SCAN_REQUEUE, dataset, attempt=attempts + 1)
        progress.set_progress("scan", dataset_id, "Queued again after a worker stopped", 0, 1)
        analyse_dataset.delay(dataset_id)
        requeued.append(dataset_id)
    if requeued:
        log.warning("watchdog requeued PII scans of datasets %s", requeued)
    if failed:
        log.error("watchdog gave up the PII scans of datasets %s (worker killed every time)", failed)
    return requeued
