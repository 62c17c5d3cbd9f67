"""Exact and near-duplicate groups inside a dataset, and the curator's decisions on them."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q

from studio import audit, forking
from studio.db import update_sql

from ..dedup import find_duplicate_groups, hash_and_similarity_text, minhash_signature
from ..models import Dataset, DuplicateGroup, Example
from .scrub import scrub_dropped

log = logging.getLogger(__name__)
Decision = DuplicateGroup.Decision


def _fill_signatures(dataset: Dataset, batch: int = 2000) -> None:
    """The exact-duplicate hash and the MinHash signature of every example that lacks them: imports
    leave both to this pass (one normalisation of the text gives both), edits reset them. The
    signatures of a batch are computed over STUDIO_CURATION_PROCESSES processes, and written with one
    executemany (Django's bulk_update builds a CASE expression per row: 60% of this pass's time)."""
    missing = Example.objects.filter(dataset=dataset, dropped=False).filter(
        Q(minhash__isnull=True) | Q(content_hash="")
    )
    sql = update_sql(connection, Example._meta.db_table, ["content_hash", "minhash"])
    last = 0
    while True:
        rows = list(
            missing.filter(pk__gt=last)
            .order_by("pk")
            .values_list("pk", "messages", "chosen", "rejected")[:batch]
        )
        if not rows:
            return
        last = rows[-1][0]
        signed = forking.split_map(
            _signatures, rows, settings.STUDIO_CURATION_PROCESSES, min_per_process=MIN_ROWS_PER_PROCESS
        )
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.executemany(sql, signed)


# Below this many examples per process the fork costs more than the second core gains.
MIN_ROWS_PER_PROCESS = 200


def _signatures(rows: list[tuple]) -> list[tuple[str, bytes, int]]:
    """(content hash, MinHash signature, id) of each (id, messages, chosen, rejected) row."""
    out = []
    for pk, messages, chosen, rejected in rows:
        digest, text = hash_and_similarity_text(messages, chosen, rejected)
        out.append((digest, minhash_signature(text), pk))
    return out


def recompute(dataset: Dataset) -> int:
    """Rebuild the undecided duplicate groups of a dataset. Decided groups are kept, and their active
    examples still take part: a new copy of an example kept by an earlier decision forms a new group
    with it (which moves the kept example into that group for the curator to decide again); a group
    made only of examples already decided is left as it was."""
    _fill_signatures(dataset)
    decided_members = set(
        Example.objects.filter(
            dataset=dataset, duplicate_group__decision__in=[Decision.KEEP_ALL, Decision.KEEP_ONE]
        ).values_list("pk", flat=True)
    )
    items = [
        (pk, h, bytes(sig))
        for pk, h, sig in Example.objects.filter(dataset=dataset, dropped=False)
        .order_by("position")
        .values_list("pk", "content_hash", "minhash")
        .iterator(chunk_size=5000)
    ]
    found = find_duplicate_groups(items, threshold=settings.STUDIO_NEAR_DUP_THRESHOLD)
    groups = [g for g in found if not set(g.member_ids) <= decided_members]
    with transaction.atomic():
        # the dataset's row first, as a curator's decision takes it (see services.scrub's docstring): the
        # two then run one after the other instead of each holding rows the other wants
        Dataset.objects.select_for_update(no_key=True).get(pk=dataset.pk)
        Example.objects.filter(dataset=dataset, duplicate_group__decision=Decision.PENDING).update(
            duplicate_group=None
        )
        DuplicateGroup.objects.filter(dataset=dataset, decision=Decision.PENDING).delete()
        for g in groups:
            row = DuplicateGroup.objects.create(
                dataset=dataset, kind=g.kind, similarity=round(g.similarity, 3)
            )
            Example.objects.filter(pk__in=g.member_ids).update(duplicate_group=row)
    log.info("dataset %s duplicate groups=%s", dataset.pk, len(groups))
    return len(groups)


def _check(decision: str) -> None:
    if decision not in (Decision.KEEP_ALL, Decision.KEEP_ONE):
        raise ValueError(f"unknown decision {decision!r}")


def decide(group: DuplicateGroup, decision: str, user) -> None:
    """Keep one: the first member not already dropped stays (the first of all when every one was),
    the others are dropped. Keep all: every member is active again. The audit event names the
    examples the decision dropped and restored."""
    _check(decision)
    with transaction.atomic():
        # The dataset's row, the group's and its members' before the audit event (scrub_dropped below takes
        # the dataset's again: waiting for it while holding the audit log's lock deadlocked with an import
        # or a curator's scrub), and the members as they are now: one dropped or restored meanwhile counts.
        Dataset.objects.select_for_update(no_key=True).get(pk=group.dataset_id)
        if DuplicateGroup.objects.select_for_update().filter(pk=group.pk).first() is None:
            return  # rebuilt meanwhile by the duplicate analysis of a new upload: its groups are listed
        members = list(Example.objects.select_for_update().filter(duplicate_group=group).order_by("position"))
        if decision == Decision.KEEP_ONE:
            kept = next((m for m in members if not m.dropped), members[0]) if members else None
            keep = [kept] if kept else []
        else:
            keep = members
        keep_ids = {m.pk for m in keep}
        restored = [m.pk for m in members if m.dropped and m.pk in keep_ids]
        dropped = [m.pk for m in members if not m.dropped and m.pk not in keep_ids]
        Example.objects.filter(pk__in=dropped).update(dropped=True)
        Example.objects.filter(pk__in=restored).update(dropped=False)
        group.decision = decision
        group.decided_by = user
        group.save(update_fields=["decision", "decided_by"])
        audit.record(
            user,
            f"duplicates.{decision}",
            group.dataset,
            group=group.pk,
            members=len(members),
            dropped=dropped,
            restored=restored,
        )
        if dropped:
            scrub_dropped(group.dataset, dropped, user)


def decide_all(dataset: Dataset, decision: str, user, *, batch: int = 500) -> int:
    """``decide`` for every pending group of the dataset, ``batch`` groups per transaction: their members
    read in one query and updated in two, instead of a dozen queries per group (a 100,000-example
    dataset has thousands of groups). Each group is decided as ``decide`` would, one audit event each;
    the members dropped are scrubbed once per batch."""
    _check(decision)
    ids = list(
        DuplicateGroup.objects.filter(dataset=dataset, decision=Decision.PENDING)
        .order_by("id")
        .values_list("pk", flat=True)
    )
    for i in range(0, len(ids), batch):
        _decide_batch(dataset, ids[i : i + batch], decision, user)
    return len(ids)


def _decide_batch(dataset: Dataset, group_ids: list[int], decision: str, user) -> None:
    with transaction.atomic():
        # the same locks in the same order as ``decide``: the dataset's row, the groups, their members
        locked = Dataset.objects.select_for_update(no_key=True).get(pk=dataset.pk)
        groups = list(DuplicateGroup.objects.select_for_update().filter(pk__in=group_ids).order_by("id"))
        if not groups:
            return  # rebuilt meanwhile by the duplicate analysis of a new upload
        members: dict[int, list[tuple[int, bool]]] = {g.pk: [] for g in groups}
        rows = (
            Example.objects.select_for_update()
            .filter(duplicate_group__in=list(members))
            .order_by("position")
            .values_list("duplicate_group_id", "pk", "dropped")
        )
        for group_id, pk, dropped in rows:
            members[group_id].append((pk, dropped))
        all_dropped: list[int] = []
        all_restored: list[int] = []
        events = []
        for g in groups:
            group_members = members[g.pk]
            if decision == Decision.KEEP_ONE:
                kept = (
                    next((m for m in group_members if not m[1]), group_members[0]) if group_members else None
                )
                keep_ids = {kept[0]} if kept else set()
            else:
                keep_ids = {pk for pk, _ in group_members}
            restored = [pk for pk, dropped in group_members if dropped and pk in keep_ids]
            dropped = [pk for pk, was_dropped in group_members if not was_dropped and pk not in keep_ids]
            all_dropped += dropped
            all_restored += restored
            events.append((g.pk, len(group_members), dropped, restored))
        for chunk in _chunks(all_dropped):
            Example.objects.filter(pk__in=chunk).update(dropped=True)
        for chunk in _chunks(all_restored):
            Example.objects.filter(pk__in=chunk).update(dropped=False)
        DuplicateGroup.objects.filter(pk__in=[g.pk for g in groups]).update(
            decision=decision, decided_by=user
        )
        for group_id, n, dropped, restored in events:
            audit.record(
                user,
                f"duplicates.{decision}",
                locked,
                group=group_id,
                members=n,
                dropped=dropped,
                restored=restored,
            )
        if all_dropped:
            scrub_dropped(locked, all_dropped, user)


def _chunks(ids: list[int], size: int = 5000):
    for i in range(0, len(ids), size):
        yield ids[i : i + size]
