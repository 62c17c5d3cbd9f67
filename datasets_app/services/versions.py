"""Splits, freezing immutable versions, diffs and export."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from django.db import transaction
from django.db.models import Max

from studio import audit

from ..models import Dataset, DatasetVersion, Example, PiiFinding, Upload, VersionExample
from ..tokens import token_stats
from . import scrub


class FreezeRefused(Exception):
    """Why a dataset can't be frozen yet, in plain words."""


# --- splits -------------------------------------------------------------------------------------------


def split_by_ratio(dataset: Dataset, train: float, eval_: float, golden: float, seed: int, user) -> dict:
    total = train + eval_ + golden
    if total <= 0 or min(train, eval_, golden) < 0:
        raise ValueError("Ratios must be zero or more and add up to more than zero.")
    with transaction.atomic():
        # the dataset's row first (see services.scrub's docstring): two splits at once run one after the
        # other (each moving its rows in its own order, they deadlocked), as a freeze or a scrub does
        Dataset.objects.select_for_update(no_key=True).get(pk=dataset.pk)
        ids = list(
            Example.objects.filter(dataset=dataset, dropped=False)
            .order_by("position")
            .values_list("pk", flat=True)
        )
        random.Random(seed).shuffle(ids)
        n = len(ids)
        n_eval = round(n * eval_ / total)
        # cumulative rounding: the three parts add up to n, and a 0 % share gets no example (rounding each
        # share on its own gave 0/50/50 of 5 examples as 2 eval, 2 golden and 1 train)
        n_golden = round(n * (eval_ + golden) / total) - n_eval
        parts = {
            Example.Split.EVAL: ids[:n_eval],
            Example.Split.GOLDEN: ids[n_eval : n_eval + n_golden],
            Example.Split.TRAIN: ids[n_eval + n_golden :],
        }
        for split, members in parts.items():
            for i in range(0, len(members), 5000):
                Example.objects.filter(pk__in=members[i : i + 5000]).update(split=split)
        counts = {k: len(v) for k, v in parts.items()}
        audit.record(user, "dataset.split", dataset, seed=seed, ratios=[train, eval_, golden], **counts)
    return counts


# --- freezing -----------------------------------------------------------------------------------------


def canonical_record(messages, chosen, rejected, tags, split) -> dict:
    body = {"messages": messages, "tags": tags, "split": split}
    if chosen is not None:
        body["chosen"] = chosen
        body["rejected"] = rejected
    return body


def record_digest(body: dict) -> str:
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
    ).hexdigest()


def blockers(dataset: Dataset) -> list[str]:
    problems = []
    active = Example.objects.filter(dataset=dataset, dropped=False)
    if Upload.objects.filter(
        dataset=dataset, status__in=[Upload.Status.QUEUED, Upload.Status.PROCESSING]
    ).exists():
        problems.append("An upload is still being imported; wait for it to finish.")
    if not active.exists():
        problems.append("The dataset has no examples; upload a file first.")
    # dropped examples too: the scan covers them, so that none keeps raw personal data
    unscanned = Example.objects.filter(dataset=dataset, pii_status=Example.Pii.UNSCANNED).count()
    scan_failed = scrub.scan_failure(dataset) if unscanned else None
    if scan_failed:
        problems.append(f"{unscanned} examples have not been scanned for personal data: {scan_failed}")
    elif unscanned:
        problems.append(
            f"{unscanned} examples have not been scanned for personal data yet; wait for the scan."
        )
    pending = PiiFinding.objects.filter(
        dataset=dataset, decision=PiiFinding.Decision.PENDING, example__dropped=False
    ).count()
    if pending:
        problems.append(f"{pending} personal-data findings are still to review: accept or reject them first.")
    return problems


def freeze(dataset: Dataset, user, changelog: str = "") -> DatasetVersion:
    with transaction.atomic():
        locked = Dataset.objects.select_for_update().get(pk=dataset.pk)
        problems = blockers(locked)
        if problems:
            raise FreezeRefused(" ".join(problems))
        previous = locked.versions.order_by("-number").first()
        number = (locked.versions.aggregate(m=Max("number"))["m"] or 0) + 1
        version = DatasetVersion(
            dataset=locked,
            number=number,
            kind=locked.kind,
            sha256="",
            base_model=locked.base_model,
            changelog=changelog.strip(),
            created_by=user,
        )
        version.save()
        digest = hashlib.sha256()
        splits: Counter[str] = Counter()
        tags: Counter[str] = Counter()
        lengths: list[int] = []
        rows: list[VersionExample] = []
        file_digest = hashlib.sha256()  # of the export file's bytes, what an auditor can check
        examples = Example.objects.filter(dataset=locked, dropped=False).order_by("position")
        for position, ex in enumerate(examples.iterator(chunk_size=2000)):
            body = canonical_record(ex.messages, ex.chosen, ex.rejected, ex.tags, ex.split)
            line = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
            digest.update(line.encode() + b"\n")
            file_digest.update(export_line(ex.messages, ex.chosen, ex.rejected, ex.tags, ex.split))
            rows.append(
                VersionExample(
                    version=version,
                    example_id=ex.pk,
                    position=position,
                    messages=ex.messages,
                    chosen=ex.chosen,
                    rejected=ex.rejected,
                    tags=ex.tags,
                    split=ex.split,
                    token_count=ex.token_count,
                    digest=hashlib.sha256(line.encode()).hexdigest(),
                )
            )
            splits[ex.split] += 1
            tags.update(ex.tags)
            lengths.append(ex.token_count)
            if len(rows) >= 2000:
                VersionExample.objects.bulk_create(rows)
                rows.clear()
        VersionExample.objects.bulk_create(rows)
        # Checked again now that the examples are copied: an edit does not wait for the dataset's lock, and
        # one saved since the check above may be in the copy, its new text not scanned yet. It marked the
        # example unscanned in the same row update, and no finding can be accepted while this lock is held,
        # so such a copy always shows here (unscanned, or findings to review): the freeze is rolled back.
        problems = blockers(locked)
        if problems:
            raise FreezeRefused(" ".join(problems))
        stats = token_stats(lengths)
        version.sha256 = digest.hexdigest()
        version.counts = {
            "examples": len(lengths),
            "train": splits.get("train", 0),
            "eval": splits.get("eval", 0),
            "golden": splits.get("golden", 0),
            "tags": dict(tags.most_common(50)),
            # sha256 of the bytes `export_dataset` and the download write (not the canonical sha256)
            EXPORT_SHA256: file_digest.hexdigest(),
        }
        version.token_stats = stats_to_dict(stats)
        version.diff_summary = diff_page(previous, version, limit=0).summary if previous else {}
        version.save(_allow_update=True)
        audit.record(
            user,
            "dataset.freeze",
            version,
            dataset=locked.pk,
            number=number,
            sha256=version.sha256,
            examples=len(lengths),
        )
    return version


def stats_to_dict(stats) -> dict:
    return {
        "count": stats.count,
        "total": stats.total,
        "mean": stats.mean,
        "median": stats.median,
        "p95": stats.p95,
        "max": stats.max,
        "min": stats.min,
        "histogram": [list(b) for b in stats.histogram],
    }


# --- diff ---------------------------------------------------------------------------------------------


@dataclass
class VersionDiff:
    added: list[int] = field(default_factory=list)  # VersionExample ids in the newer version
    removed: list[int] = field(default_factory=list)  # VersionExample ids in the older version
    changed: list[tuple[int, int]] = field(default_factory=list)  # (old id, new id)

    def summary(self) -> dict:
        return {"added": len(self.added), "removed": len(self.removed), "changed": len(self.changed)}


def _by_example(version: DatasetVersion) -> Iterator[tuple[int, int, str]]:
    return (
        version.examples.order_by("example_id")
        .values_list("example_id", "pk", "digest")
        .iterator(chunk_size=5000)
    )


def iter_diff(old: DatasetVersion, new: DatasetVersion) -> Iterator[tuple[str, int | None, int | None]]:
    """("added", None, new id) / ("removed", old id, None) / ("changed", old id, new id) in source
    example order. Examples are matched across versions by their source example id; both versions are
    read sorted by it in chunks and merged, so memory stays flat however big the versions are."""
    a, b = _by_example(old), _by_example(new)
    x, y = next(a, None), next(b, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            yield "removed", x[1], None
            x = next(a, None)
        elif x is None or y[0] < x[0]:
            yield "added", None, y[1]
            y = next(b, None)
        else:
            if x[2] != y[2]:
                yield "changed", x[1], y[1]
            x, y = next(a, None), next(b, None)


def diff(old: DatasetVersion, new: DatasetVersion) -> VersionDiff:
    """The whole diff as id lists (small versions, tests); pages use ``diff_page``."""
    result = VersionDiff()
    for kind, a, b in iter_diff(old, new):
        if kind == "added":
            result.added.append(b)
        elif kind == "removed":
            result.removed.append(a)
        else:
            result.changed.append((a, b))
    result.added.sort()
    result.removed.sort()
    result.changed.sort()
    return result


@dataclass
class DiffPage:
    summary: dict  # {"added", "removed", "changed"}: totals
    added: list[int]  # VersionExample ids on this page
    removed: list[int]
    changed: list[tuple[int, int]]


def diff_page(old: DatasetVersion, new: DatasetVersion, *, page: int = 1, limit: int = 50) -> DiffPage:
    """Totals of the diff plus page ``page`` (``limit`` of each kind), keeping only that page in memory."""
    start = (page - 1) * limit
    counts = {"added": 0, "removed": 0, "changed": 0}
    kept: dict[str, list] = {"added": [], "removed": [], "changed": []}
    for kind, a, b in iter_diff(old, new):
        if start <= counts[kind] < start + limit:
            kept[kind].append(b if kind == "added" else a if kind == "removed" else (a, b))
        counts[kind] += 1
    return DiffPage(counts, kept["added"], kept["removed"], kept["changed"])


# --- export -------------------------------------------------------------------------------------------

EXPORT_SHA256 = "export_sha256"  # key in DatasetVersion.counts

# JSON allows these raw inside strings, but str.splitlines(), many editors and some JSONL readers end a
# line at them: escaped, every line of the file is exactly one object (json.loads gives the same text).
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def export_line(messages, chosen, rejected, tags, split) -> bytes:
    """One line of the export file (UTF-8, no BOM, ``\\n``-terminated)."""
    body: dict = {"messages": messages}
    if chosen is not None:
        body["chosen"] = chosen
        body["rejected"] = rejected
    if tags:
        body["tags"] = tags
    body["split"] = split
    return (json.dumps(body, ensure_ascii=False).translate(_LINE_BREAKS) + "\n").encode()


def export_lines(version: DatasetVersion) -> Iterator[bytes]:
    """OpenAI chat JSONL in import order (messages, plus tags and split; chosen/rejected for preference)."""
    for ex in version.examples.order_by("position").iterator(chunk_size=2000):
        yield export_line(ex.messages, ex.chosen, ex.rejected, ex.tags, ex.split)


def export_sha256(version: DatasetVersion) -> str:
    """SHA-256 of the export file's bytes (``sha256sum`` of a download or of ``export_dataset --out``).

    Recorded when the version is frozen; computed once (streaming) and cached for older versions."""
    known = (version.counts or {}).get(EXPORT_SHA256)
    if known:
        return known
    from django.core.cache import cache

    key = f"dataset-version-export-sha256:{version.pk}"
    value = cache.get(key)
    if value is None:
        digest = hashlib.sha256()
        for line in export_lines(version):
            digest.update(line)
        value = digest.hexdigest()
        cache.set(key, value, None)
    return value
