"""Append-only, hash-chained audit log.

`record()` must be called inside the transaction that makes the state change, so the event and the
change commit together. Writers are serialised (PostgreSQL advisory lock; SQLite runs write
transactions one at a time) so the chain never forks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from django.db import connection, transaction
from django.utils import timezone

from .models import AuditEvent

GENESIS = "0" * 64
_LOCK_ID = 0x57D10A0D


def _canonical(event: AuditEvent) -> bytes:
    body = {
        "prev": event.prev_hash,
        "at": event.created_at.isoformat(),
        "actor": event.actor_id,
        "actor_name": event.actor_name,
        "verb": event.verb,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "object_repr": event.object_repr,
        "data": event.data,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def compute_hash(event: AuditEvent) -> str:
    return hashlib.sha256(_canonical(event)).hexdigest()


def record(actor, verb: str, obj=None, **data) -> AuditEvent:
    """Append one event. `data` is a small JSON summary: ids and counts, never message text."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_ID])
        last = AuditEvent.objects.order_by("-id").values_list("hash", flat=True).first()
        user = actor if getattr(actor, "is_authenticated", False) else None
        event = AuditEvent(
            created_at=timezone.now(),
            actor=user,
            actor_name=(user.get_username() if user else (actor if isinstance(actor, str) else "system")),
            verb=verb,
            object_type=(obj._meta.model_name if obj is not None else ""),
            object_id=(str(obj.pk) if obj is not None else ""),
            object_repr=(str(obj)[:200] if obj is not None else ""),
            data=json.loads(json.dumps(data, default=str)),
            prev_hash=last or GENESIS,
        )
        event.hash = compute_hash(event)
        event.save()
        return event


@dataclass
class ChainReport:
    checked: int
    broken_at: int | None = None
    problem: str = ""
    head_id: int | None = None  # the newest event: record its hash elsewhere to detect truncation
    head_hash: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_at is None and not self.problem


def verify_chain(
    expect: str = "", *, after_id: int | None = None, after_hash: str = "", checked: int = 0
) -> ChainReport:
    """Walk the chain in insertion order; report the first event whose link or content is wrong.

    The chain cannot show that its newest events were deleted (what is left still links up). For that,
    ``expect`` is a head hash recorded earlier outside the database (``verify_audit`` prints it): it
    must still be in the chain. ``after_id``/``after_hash``/``checked``: continue from an event already
    verified (its id and hash, and how many events up to it were checked), reading only the newer ones."""
    prev = after_hash if after_id is not None else GENESIS
    head_id = after_id
    seen_expected = not expect
    events = AuditEvent.objects.order_by("id")
    if after_id is not None:
        events = events.filter(id__gt=after_id)
    for event in events.iterator(chunk_size=2000):
        if event.prev_hash != prev:
            return ChainReport(
                checked,
                event.pk,
                "its previous-hash link does not match the event before it "
                "(an event was deleted or inserted)",
            )
        if compute_hash(event) != event.hash:
            return ChainReport(checked, event.pk, "its content does not match its hash (the row was edited)")
        prev = event.hash
        head_id = event.pk
        seen_expected = seen_expected or event.hash == expect
        checked += 1
    report = ChainReport(checked, head_id=head_id, head_hash=prev if head_id else "")
    if not seen_expected:
        report.problem = (
            f"the recorded head {expect[:16]}… is no longer in the log: events after it were deleted "
            "(or the hash was not recorded from this studio)"
        )
    return report
