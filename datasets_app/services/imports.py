"""Uploading and importing files into a dataset.

An import is all-or-nothing: every good record of a file is inserted inside one transaction, bad
records are reported with their line numbers (and kept, encrypted, for download), and a file with
no good record creates nothing. Logs carry ids and counts only, never text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import connections, router, transaction
from django.db.models import F, JSONField, Q
from django.utils import timezone

from studio import audit

from .. import parsing
from ..dedup import content_hash
from ..models import Dataset, Example, Upload
from . import progress, storage

log = logging.getLogger(__name__)

FIRST_REJECTIONS = 100
STALE_AFTER = timedelta(minutes=3)


class ImportRefused(Exception):
    """A whole-file problem, in plain words."""


@dataclass
class ImportResult:
    upload: Upload
    imported: int
    rejected: int
    rejections: list[dict]


# --- receiving a file -------------------------------------------------------------------------------


def receive_upload(dataset: Dataset, user, name: str, chunks: Iterable[bytes], *, fmt: str = "") -> Upload:
    """Stream an uploaded file to the data dir (never whole in memory) and create its Upload row."""
    suffix = Path(name).suffix.lower()[:10]
    dest = storage.new_upload_path(suffix if suffix.isascii() else "")
    digest = hashlib.sha256()
    size = 0
    limit = settings.STUDIO_UPLOAD_MAX_BYTES
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise ImportRefused(
                        f"The file is larger than the upload limit of {limit // (1024 * 1024)} MB. "
                        "Split it into smaller files and upload them one by one."
                    )
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        storage.remove_quietly(dest)
        raise
    if size == 0:
        storage.remove_quietly(dest)
        raise ImportRefused("The file is empty. Choose a file with one conversation per line.")
    upload = Upload.objects.create(
        dataset=dataset,
        uploaded_by=user if getattr(user, "is_authenticated", False) else None,
        original_name=Path(name).name[:255],
        size=size,
        sha256=digest.hexdigest(),
        format=fmt,
        raw_path=str(dest),
        status=Upload.Status.QUEUED,
    )
    return upload


def receive_path(dataset: Dataset, user, path: Path, *, fmt: str = "") -> Upload:
    """Command-line variant: copy a local file in, streaming."""

    def read():
        with open(path, "rb") as fh:
            while chunk := fh.read(storage.CHUNK):
                yield chunk

    return receive_upload(dataset, user, path.name, read(), fmt=fmt)


def needs_csv_mapping(upload: Upload) -> bool:
    if upload.format and upload.format != "csv":
        return False
    try:
        return parsing.detect_format(upload.raw_path) == "csv"
    except parsing.FileError:
        return False


def csv_columns(upload: Upload) -> list[str]:
    return parsing.csv_columns(upload.raw_path)


def set_csv_mapping(upload: Upload, mapping: parsing.CsvMapping) -> None:
    upload.csv_mapping = {k: v for k, v in vars(mapping).items() if v}
    upload.format = "csv"
    upload.status = Upload.Status.QUEUED
    upload.save(update_fields=["csv_mapping", "format", "status"])


def enqueue(upload: Upload) -> None:
    from ..tasks import process_upload

    transaction.on_commit(lambda: process_upload.delay(upload.pk))


# --- processing ------------------------------------------------------------------------------------


def claim(upload_id: int) -> Upload | None:
    """Take the upload for processing with a conditional UPDATE, so it never runs twice at once. A
    redelivered task whose first attempt died (worker killed) may re-take it once its progress
    stopped moving for STALE_AFTER."""
    now = timezone.now()
    cutoff = now - STALE_AFTER
    condition = Q(status=Upload.Status.QUEUED)
    live = progress.get_progress("upload", upload_id)
    if not (live and live.get("at", 0) > cutoff.timestamp()):
        condition |= Q(status=Upload.Status.PROCESSING, started_at__lt=cutoff)
    taken = Upload.objects.filter(Q(pk=upload_id) & condition).update(
        status=Upload.Status.PROCESSING, started_at=now, attempts=F("attempts") + 1
    )
    if not taken:
        return None
    return Upload.objects.select_related("dataset", "dataset__base_model").get(pk=upload_id)


def _token_counter(dataset: Dataset):
    """Batched token counting with the dataset's base model tokenizer (None when no model is set)."""
    base = dataset.base_model
    if base is None or not base.local_dir.exists():
        return None, None
    from ..tokens import count_many, load_tokenizer

    tokenizer = load_tokenizer(str(base.local_dir))

    def count(records: list[parsing.Record]) -> list[int]:
        convs = []
        for rec in records:
            if rec.chosen is None:
                convs.append(rec.messages)
            else:
                convs.append(rec.messages + [{"role": "assistant", "content": rec.chosen}])
                convs.append(rec.messages + [{"role": "assistant", "content": rec.rejected}])
        counts = count_many(tokenizer, convs)
        out, i = [], 0
        for rec in records:
            if rec.chosen is None:
                out.append(counts[i])
                i += 1
            else:
                out.append(max(counts[i], counts[i + 1]))
                i += 2
        return out

    return count, base.context_length


def search_text(messages: list[dict], chosen: str | None, rejected: str | None) -> str:
    parts = [m["content"] for m in messages] + [t for t in (chosen, rejected) if t is not None]
    return "\n".join(parts).lower()


_json_string = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str


def messages_json(messages: list[dict]) -> str:
    """``json.dumps(messages)``, the text a JSONField stores, written directly for the usual
    ``[{"role": ..., "content": ...}, ...]`` turns of a parsing.Record (about twice as fast)."""
    if all(type(m) is dict and len(m) == 2 and next(iter(m)) == "role" for m in messages):
        try:
            turns = [
                f'{{"role": {_json_string(m["role"])}, "content": {_json_string(m["content"])}}}'
                for m in messages
            ]
            return "[" + ", ".join(turns) + "]"
        except (KeyError, TypeError):
            pass
    return json.dumps(messages)


def tags_text(tags: list[str]) -> str:
    return ("|" + "|".join(tags) + "|")[:1000] if tags else ""


class _Rejections:
    """Counts by reason, the first 100 with line numbers, and every rejected line (encrypted)."""

    def __init__(self, upload: Upload):
        self.counts: Counter[str] = Counter()
        self.first: list[dict] = []
        self.path = storage.data_path("uploads", "rejects", f"{upload.pk}.rejects.enc")
        self.writer = storage.EncryptedWriter(self.path)

    def add(self, line: int, code: str, reason: str, raw: bytes) -> None:
        self.counts[code] += 1
        if len(self.first) < FIRST_REJECTIONS:
            self.first.append({"line": line, "code": code, "reason": reason})
        self.writer.write(raw.rstrip(b"\r\n") + b"\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> str:
        keep = self.total > 0
        self.writer.close(keep=keep)
        return str(self.path) if keep else ""


def _record_bytes(rec: parsing.Record) -> bytes:
    body = {"messages": rec.messages, "tags": rec.tags}
    if rec.chosen is not None:
        body.update(chosen=rec.chosen, rejected=rec.rejected)
    return json.dumps(body, ensure_ascii=False).encode()


# Columns that vary per example, in the order _insert_examples puts them; every other column of
# Example gets its default (auto_now/auto_now_add: the batch's time), prepared once per batch.
_ROW_COLUMNS = (
    "position",
    "source_line",
    "messages",
    "chosen",
    "rejected",
    "tags",
    "tags_text",
    "search_text",
    "content_hash",
    "token_count",
)


def _fixed_columns(dataset: Dataset, upload: Upload, connection) -> tuple[list[str], tuple]:
    """(column names, database values) of the columns every example of a batch shares."""
    now = timezone.now()
    columns, values = [], []
    for field in Example._meta.concrete_fields:
        if field.primary_key or field.attname in _ROW_COLUMNS:
            continue
        if field.attname == "dataset_id":
            value = dataset.pk
        elif field.attname == "upload_id":
            value = upload.pk
        elif getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
            value = now
        else:
            value = field.get_default()
        if isinstance(field, JSONField):
            value = None if value is None else json.dumps(value, cls=field.encoder)
        else:
            value = field.get_db_prep_save(value, connection)
        columns.append(field.column)
        values.append(value)
    return columns, tuple(values)


def _insert_examples(
    dataset: Dataset, upload: Upload, records: list[parsing.Record], start: int, token_counts: list[int]
) -> None:
    """Insert the examples of a batch, in order, with the values ``Example.objects.bulk_create`` would
    write (JSON as ``json.dumps`` text), but without building model instances: one ``executemany`` on
    SQLite, ``COPY`` on PostgreSQL. Runs inside the import's transaction."""
    if not records:
        return
    connection = connections[router.db_for_write(Example)]
    fixed_names, fixed = _fixed_columns(dataset, upload, connection)
    tag_columns: dict[tuple[str, ...], tuple[str, str]] = {}  # tags -> (JSON, tags_text): few distinct ones
    rows = []
    for i, (rec, n) in enumerate(zip(records, token_counts, strict=True)):
        key = tuple(rec.tags)
        tag_values = tag_columns.get(key)
        if tag_values is None:
            tag_values = tag_columns[key] = (json.dumps(rec.tags), tags_text(rec.tags))
        rows.append(
            (
                start + i,
                rec.line,
                messages_json(rec.messages),
                rec.chosen,
                rec.rejected,
                *tag_values,
                search_text(rec.messages, rec.chosen, rec.rejected),
                content_hash(rec.messages, rec.chosen, rec.rejected),
                n,
                *fixed,
            )
        )
    qn = connection.ops.quote_name
    names = [Example._meta.get_field(name).column for name in _ROW_COLUMNS] + fixed_names
    table, column_list = qn(Example._meta.db_table), ", ".join(qn(c) for c in names)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            sql = f"COPY {table} ({column_list}) FROM STDIN"
            with connection.wrap_database_errors, cursor.cursor.copy(sql) as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            placeholders = ", ".join(["%s"] * len(names))
            sql = f"INSERT INTO {table} ({column_list}) VALUES ({placeholders})"  # noqa: S608 - model names only
            cursor.executemany(sql, rows)


def process(upload_id: int) -> ImportResult | None:
    """Validate and import an upload. Returns None if someone else holds it."""
    upload = claim(upload_id)
    if upload is None:
        log.info("upload %s not claimable (already processed or being processed)", upload_id)
        return None
    dataset = upload.dataset
    rejections = _Rejections(upload)
    batch_size = settings.STUDIO_IMPORT_BATCH
    mapping = parsing.CsvMapping(**upload.csv_mapping) if upload.csv_mapping else None
    imported = 0
    try:
        count_tokens, context = _token_counter(dataset)

        def report_progress(done: int, total: int) -> None:
            progress.set_progress("upload", upload.pk, "Validating and importing", done, total)

        records = parsing.parse_file(
            upload.raw_path,
            fmt=upload.format or None,
            kind=dataset.kind,
            csv_mapping=mapping,
            progress=report_progress,
        )
        with transaction.atomic():
            locked = Dataset.objects.select_for_update().get(pk=dataset.pk)
            position = locked.next_position
            pending: list[parsing.Record] = []

            def flush() -> None:
                nonlocal position, imported
                counts = count_tokens(pending) if count_tokens is not None else [0] * len(pending)
                good, good_counts = [], []
                for rec, n in zip(pending, counts, strict=True):
                    if count_tokens is not None and n > context:
                        rejections.add(
                            rec.line,
                            "too_long",
                            f"the conversation is {n} tokens long; the base model "
                            f"{dataset.base_model.name} takes at most {context}. Shorten or split it.",
                            _record_bytes(rec),
                        )
                        continue
                    good.append(rec)
                    good_counts.append(n)
                _insert_examples(locked, upload, good, position, good_counts)
                position += len(good)
                imported += len(good)
                pending.clear()

            for item in records:
                if isinstance(item, parsing.Rejection):
                    rejections.add(item.line, item.code, item.reason, item.raw)
                    continue
                pending.append(item)
                if len(pending) >= batch_size:
                    flush()
            flush()
            if imported == 0:
                raise ImportRefused("No line of the file could be imported; nothing was added.")
            Dataset.objects.filter(pk=locked.pk).update(next_position=position)
            upload.status = Upload.Status.IMPORTED
            _finish(upload, imported, rejections)
            audit.record(
                upload.uploaded_by,
                "dataset.import",
                dataset,
                upload=upload.pk,
                imported=imported,
                rejected=rejections.total,
                format=upload.format,
            )
    except parsing.FileError as exc:
        _refuse(upload, rejections, exc.reason, {"code": exc.code, "line": exc.line, "reason": exc.reason})
        return ImportResult(upload, 0, rejections.total, rejections.first)
    except ImportRefused as exc:
        _refuse(upload, rejections, str(exc), None)
        return ImportResult(upload, 0, rejections.total, rejections.first)
    except Exception:
        log.exception("upload %s failed", upload.pk)
        rejections.writer.close(keep=False)
        Upload.objects.filter(pk=upload.pk).update(
            status=Upload.Status.FAILED,
            error="The import failed unexpectedly and nothing was added. An engineer can find the "
            f"details in the worker log (upload {upload.pk}).",
            finished_at=timezone.now(),
        )
        progress.clear_progress("upload", upload.pk)
        _dispose_original(upload)
        raise
    _dispose_original(upload)
    progress.clear_progress("upload", upload.pk)
    log.info("upload %s imported=%s rejected=%s", upload.pk, imported, rejections.total)
    return ImportResult(upload, imported, rejections.total, rejections.first)


def _finish(upload: Upload, imported: int, rejections: _Rejections, error: str = "", file_error=None) -> None:
    upload.imported_count = imported
    upload.rejected_count = rejections.total
    upload.rejects_path = rejections.close()
    upload.report = {"counts": dict(rejections.counts), "first": rejections.first}
    if file_error:
        upload.report["file_error"] = file_error
    if upload.format == "" and upload.status == Upload.Status.IMPORTED:
        with contextlib.suppress(parsing.FileError):
            upload.format = parsing.detect_format(upload.raw_path)
    upload.error = error
    upload.finished_at = timezone.now()
    upload.save()


def _refuse(upload: Upload, rejections: _Rejections, reason: str, file_error) -> None:
    upload.status = Upload.Status.REJECTED
    _finish(upload, 0, rejections, error=reason, file_error=file_error)
    _dispose_original(upload)
    progress.clear_progress("upload", upload.pk)
    log.info("upload %s rejected whole (%s rejected lines)", upload.pk, rejections.total)


def _dispose_original(upload: Upload) -> None:
    """No raw personal data at rest: encrypt the original (or delete it, per setting)."""
    raw = Path(upload.raw_path) if upload.raw_path else None
    if raw is None or not raw.exists():
        return
    stored = ""
    if settings.STUDIO_ORIGINAL_UPLOADS == "encrypt":
        dest = storage.data_path("uploads", "originals", f"{upload.pk}.enc")
        storage.encrypt_file(raw, dest)
        stored = str(dest)
    storage.remove_quietly(raw)
    upload.raw_path, upload.stored_path = "", stored
    Upload.objects.filter(pk=upload.pk).update(raw_path="", stored_path=stored)


def delete_upload_files(upload: Upload) -> None:
    for p in (upload.raw_path, upload.stored_path, upload.rejects_path):
        storage.remove_quietly(p)


def requeue_stale(max_attempts: int = 3) -> list[int]:
    """Uploads stuck in processing (their worker died before the broker redelivered) go back to the
    queue; after `max_attempts` they fail with a reason instead of looping."""
    cutoff = timezone.now() - STALE_AFTER
    requeued = []
    for upload in Upload.objects.filter(status=Upload.Status.PROCESSING, started_at__lt=cutoff):
        live = progress.get_progress("upload", upload.pk)
        if live and live.get("at", 0) > cutoff.timestamp():
            continue
        if upload.attempts >= max_attempts:
            Upload.objects.filter(pk=upload.pk, status=Upload.Status.PROCESSING).update(
                status=Upload.Status.FAILED,
                error=f"The import was interrupted {upload.attempts} times (worker stopped); nothing was "
                "added. Upload the file again, or ask an engineer to check the workers.",
                finished_at=timezone.now(),
            )
            continue
        if Upload.objects.filter(pk=upload.pk, status=Upload.Status.PROCESSING).update(
            status=Upload.Status.QUEUED
        ):
            from ..tasks import process_upload

            process_upload.delay(upload.pk)
            requeued.append(upload.pk)
    return requeued
