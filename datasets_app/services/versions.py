"""Splits, freezing immutable versions, diffs and export."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson
from django.db import connections, router, transaction
from django.db.models import Max, TextField
from django.db.models.functions import Cast

from studio import audit
from studio.db import insert_sql

from ..models import Dataset, DatasetVersion, Example, PiiFinding, Upload, VersionExample
from ..tokens import token_stats
from . import scrub


class FreezeRefused(Exception):
    """Why a dataset can't be frozen yet, in plain words."""


class NothingChanged(FreezeRefused):
    """The dataset's content (and base model) is the newest version's: no new version. ``version`` is it."""

    def __init__(self, version: DatasetVersion):
        self.version = version
        super().__init__(
            f"Nothing changed since version {version.number} (the same examples, SHA-256 "
            f"{version.sha256[:12]}…): it is the newest version. Change the examples before freezing again."
        )


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
                # only the rows that change: SQLite writes a whole row (its messages too) for any update,
                # and most rows of a re-split stay where they were
                Example.objects.filter(pk__in=members[i : i + 5000]).exclude(split=split).update(split=split)
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


def canonical_bytes(body: dict) -> bytes:
    """The canonical JSON of a record: keys sorted, no spaces, UTF-8 (not \\u-escaped) — the bytes
    ``json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()`` gives,
    made by orjson (several times faster; byte-identical for these records, tested character by
    character), and by ``json.dumps`` for what orjson refuses (a lone surrogate)."""
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def _loads(text: str):
    """A stored JSON column's value (orjson, or ``json`` for what orjson refuses)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def record_digest(body: dict) -> str:
    return hashlib.sha256(canonical_bytes(body)).hexdigest()


def blockers(dataset: Dataset, *, unscanned: int | None = None) -> list[str]:
    """Why the dataset can't be frozen now, in plain words (none: it can). ``unscanned``: the number of
    its examples not scanned for personal data, when the caller counted them already."""
    problems = []
    active = Example.objects.filter(dataset=dataset, dropped=False)
    if Upload.objects.filter(
        dataset=dataset, status__in=[Upload.Status.QUEUED, Upload.Status.PROCESSING]
    ).exists():
        problems.append("An upload is still being imported; wait for it to finish.")
    if not active.exists():
        problems.append("The dataset has no examples; upload a file first.")
    # dropped examples too: the scan covers them, so that none keeps raw personal data
    if unscanned is None:
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
        file_digest = hashlib.sha256()  # of the export file's bytes, what an auditor can check
        # values, not model instances, and rows written with one executemany per batch: building and
        # compiling 100,000 instances took most of a freeze's time (20 s for a 100,000-example dataset).
        # The JSON columns are read as their stored text, parsed here once, and copied as they are.
        examples = (
            Example.objects.filter(dataset=locked, dropped=False)
            .order_by("position")
            .annotate(messages_json=Cast("messages", TextField()), tags_json=Cast("tags", TextField()))
            .values_list("pk", "messages_json", "chosen", "rejected", "tags_json", "split", "token_count")
        )
        rows = _VersionRows(version)
        for position, (pk, messages_json, chosen, rejected, tags_json, split, token_count) in enumerate(
            examples.iterator(chunk_size=2000)
        ):
            messages, ex_tags = _loads(messages_json), _loads(tags_json)
            line = canonical_bytes(canonical_record(messages, chosen, rejected, ex_tags, split))
            digest.update(line + b"\n")
            file_digest.update(export_line(messages, chosen, rejected, ex_tags, split))
            # in _VersionRows.COLUMNS order
            rows.add(
                pk,
                position,
                rows.json(messages_json, messages),
                chosen,
                rejected,
                rows.json(tags_json, ex_tags),
                split,
                token_count,
                hashlib.sha256(line).hexdigest(),
            )
            splits[split] += 1
            tags.update(ex_tags)
            lengths.append(token_count)
        rows.flush()
        # Checked again now that the examples are copied: an edit does not wait for the dataset's lock, and
        # one saved since the check above may be in the copy, its new text not scanned yet. It marked the
        # example unscanned in the same row update, and no finding can be accepted while this lock is held,
        # so such a copy always shows here (unscanned, or findings to review): the freeze is rolled back.
        problems = blockers(locked)
        if problems:
            raise FreezeRefused(" ".join(problems))
        sha256 = digest.hexdigest()
        if (
            previous is not None
            and previous.sha256 == sha256
            and previous.base_model_id == locked.base_model_id
        ):
            # a second click, or a freeze with no change: the same content again would be a second name
            # for one version (rolled back: no rows, no event)
            raise NothingChanged(previous)
        stats = token_stats(lengths)
        version.sha256 = sha256
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


class _VersionRows:
    """Inserts a version's rows in batches with one ``executemany`` each, without model instances."""

    COLUMNS = (
        "example_id",
        "position",
        "messages",
        "chosen",
        "rejected",
        "tags",
        "split",
        "token_count",
        "digest",
    )

    def __init__(self, version: DatasetVersion, batch: int = 2000):
        self.version_id = version.pk
        self.batch = batch
        self.connection = connections[router.db_for_write(VersionExample)]
        fields = [VersionExample._meta.get_field(name) for name in ("version", *self.COLUMNS)]
        self.json_field = VersionExample._meta.get_field("messages")  # messages and tags: plain JSONFields
        self.sql = insert_sql(self.connection, VersionExample._meta.db_table, [f.column for f in fields])
        self.rows: list[tuple] = []

    def json(self, text: str, value):
        """The database value of a JSON column: on SQLite the text the example's column holds (a JSON
        column there is its text), elsewhere ``value`` converted by the field, as ``bulk_create`` does."""
        if self.connection.vendor == "sqlite":
            return text
        return self.json_field.get_db_prep_save(value, self.connection)

    def add(self, *values) -> None:
        """One row: the values of ``COLUMNS`` in that order, JSON ones from ``json``."""
        self.rows.append((self.version_id, *values))
        if len(self.rows) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            with self.connection.cursor() as cursor:
                cursor.executemany(self.sql, self.rows)
            self.rows = []


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
    text = json.dumps(body, ensure_ascii=False)
    if "\u2028" in text or "\u2029" in text or "\u0085" in text:  # rare: translate() is slow per character
        text = text.translate(_LINE_BREAKS)
    return (text + "\n").encode()


def export_lines(version: DatasetVersion) -> Iterator[bytes]:
    """OpenAI chat JSONL in import order (messages, plus tags and split; chosen/rejected for preference).
    Read in chunks, as values: memory stays flat however big the version is."""
    rows = (
        version.examples.order_by("position")
        .values_list("messages", "chosen", "rejected", "tags", "split")
        .iterator(chunk_size=2000)
    )
    for messages, chosen, rejected, tags, split in rows:
        yield export_line(messages, chosen, rejected, tags, split)


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
