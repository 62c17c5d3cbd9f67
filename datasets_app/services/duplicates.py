"""Exact and near-duplicate groups inside a dataset, and the curator's decisions on them."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from studio import audit

from ..dedup import find_duplicate_groups, hash_and_similarity_text, minhash_signature
from ..models import Dataset, DuplicateGroup, Example

log = logging.getLogger(__name__)
Decision = DuplicateGroup.Decision


def _fill_signatures(dataset: Dataset, batch: int = 1000) -> None:
    """The exact-duplicate hash and the MinHash signature of every example that lacks them: imports
    leave both to this pass (one normalisation of the text gives both), edits reset them."""
    missing = Example.objects.filter(dataset=dataset, dropped=False).filter(
        Q(minhash__isnull=True) | Q(content_hash="")
    )
    while True:
        chunk = list(missing.order_by("pk")[:batch])
        if not chunk:
            return
        for ex in chunk:
            ex.content_hash, text = hash_and_similarity_text(ex.messages, ex.chosen, ex.rejected)
            ex.minhash = minhash_signature(text)
        Example.objects.bulk_update(chunk, ["content_hash", "minhash"])


def recompute(dataset: Dataset) -> int:
    """Rebuild the undecided duplicate groups of a dataset. Groups already decided are kept."""
    _fill_signatures(dataset)
    decided_members = set(
        Example.objects.filter(
            dataset=dataset, duplicate_group__decision__in=[Decision.KEEP_ALL, Decision.KEEP_ONE]
        ).values_list("pk", flat=True)
    )
    items = [
        (pk, h, bytes(sig))
        for pk, h, sig in Example.objects.filter(dataset=dataset, dropped=False)
        .exclude(pk__in=decided_members)
        .order_by("position")
        .values_list("pk", "content_hash", "minhash")
        .iterator(chunk_size=5000)
    ]
    groups = find_duplicate_groups(items, threshold=settings.STUDIO_NEAR_DUP_THRESHOLD)
    with transaction.atomic():
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
    _check(decision)
    with transaction.atomic():
        members = list(group.members.order_by("position"))
        if decision == Decision.KEEP_ONE:
            Example.objects.filter(pk__in=[m.pk for m in members[1:]]).update(dropped=True)
            Example.objects.filter(pk=members[0].pk).update(dropped=False)
        else:
            Example.objects.filter(pk__in=[m.pk for m in members]).update(dropped=False)
        group.decision = decision
        group.decided_by = user
        group.save(update_fields=["decision", "decided_by"])
        audit.record(user, f"duplicates.{decision}", group.dataset, group=group.pk, members=len(members))


def decide_all(dataset: Dataset, decision: str, user) -> int:
    _check(decision)
    groups = list(DuplicateGroup.objects.filter(dataset=dataset, decision=Decision.PENDING))
    for g in groups:
        decide(g, decision, user)
    return len(groups)
