"""Uploading and importing files into a dataset.

An import is all-or-nothing: every good record of a file is inserted inside one transaction, bad
records are reported with their line numbers (and kept, encrypted, for download), and a file with
no good record creates nothing. Logs carry ids and counts only, never text.

Speed: records are parsed, validated and serialised into "prepared" row values (prepare_batches),
then inserted a batch at a time by INSERT statements of 50 rows (SQLite) or COPY (PostgreSQL). From
HELPER_MIN_BYTES on, a forked helper process prepares the batches and another encrypts the original
upload while this process inserts, so an import uses two cores. The duplicate hash is not computed
here: the duplicate analysis that follows every import computes it with the MinHash signature, from
one normalisation of the text (see services.duplicates).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import pickle
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import orjson
from django.conf import settings
from django.db import connections, router, transaction
from django.db.models import F, JSONField, Q
from django.utils import timezone
from jinja2 import TemplateError

from studio import audit, forking
from studio.db import checkpoint_wal, insert_in_statements, insert_sql
from studio.queueing import quietly, send_or_fail

from .. import parsing
from ..models import Dataset, Example, Upload
from . import progress, storage

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows (which cannot fork either)
    fcntl = None

log = logging.getLogger(__name__)

FIRST_REJECTIONS = 100
PROGRESS_INTERVAL = 0.25  # seconds between progress updates of an import
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
    # a file name from the file system may hold bytes that are not UTF-8 (lone surrogates here)
    shown = Path(name).name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:255]
    try:
        return Upload.objects.create(
            dataset=dataset,
            uploaded_by=user if getattr(user, "is_authenticated", False) else None,
            original_name=shown,
            size=size,
            sha256=digest.hexdigest(),
            format=fmt,
            raw_path=str(dest),
            status=Upload.Status.QUEUED,
        )
    except BaseException:  # no row, no file: the plaintext copy must not stay behind
        storage.remove_quietly(dest)
        raise


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


def set_csv_mapping(
    upload: Upload,
    mapping: parsing.CsvMapping,
    *,
    from_status: tuple[str, ...] = (Upload.Status.NEEDS_MAPPING, Upload.Status.QUEUED),
) -> bool:
    """Record the columns and queue the upload, only while it is in one of ``from_status`` (a
    conditional UPDATE): a second submit of the form (another curator, another tab) after the import
    was queued or has started must not send it back to the queue with other columns. False when not."""
    fields = {"csv_mapping": {k: v for k, v in vars(mapping).items() if v}, "format": "csv"}
    done = Upload.objects.filter(pk=upload.pk, status__in=from_status).update(
        status=Upload.Status.QUEUED, **fields
    )
    if done:
        upload.csv_mapping, upload.format = fields["csv_mapping"], fields["format"]
        upload.status = Upload.Status.QUEUED
    return bool(done)


QUEUE_DOWN_ERROR = (
    "The studio's task queue was unreachable when this file arrived, so it was not imported and never "
    "will be. Upload the file again in a minute; if the queue stays down, tell a studio engineer."
)


def enqueue(upload: Upload) -> None:
    """Send the import task once the row is committed; with the broker down the upload fails with a
    reason at once (studio.queueing) and its plaintext original is deleted."""
    transaction.on_commit(lambda: _send(upload))


def _send(upload: Upload) -> None:
    from ..tasks import process_upload

    def failed() -> None:
        storage.remove_quietly(upload.raw_path)  # the plaintext original never stays on disk
        log.error("upload %s failed: the broker is unreachable", upload.pk)

    send_or_fail(
        lambda: process_upload.delay(upload.pk),
        Upload.objects.filter(pk=upload.pk, status=Upload.Status.QUEUED),
        {
            "status": Upload.Status.FAILED,
            "error": QUEUE_DOWN_ERROR,
            "finished_at": timezone.now(),
            "raw_path": "",
        },
        failed,
    )


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


def json_text(value) -> str:
    """The JSON text stored for a JSONField value: orjson's compact UTF-8 (several times faster than
    ``json.dumps``; any JSON reads back the same), ``json.dumps`` for what orjson refuses."""
    try:
        return orjson.dumps(value).decode("utf-8")
    except orjson.JSONEncodeError:
        return json.dumps(value)


# "|" separates the tags in tags_text; a "|" inside a tag is stored as this control character, or a
# filter for "billing|refund" would match the two tags billing and refund.
TAG_BAR = "\x1f"


def tag_filter_text(tag: str) -> str:
    """What ``tags_text`` contains when an example has exactly this tag."""
    return "|" + tag.replace("|", TAG_BAR) + "|"


def tags_text(tags: list[str]) -> str:
    return "|" + "|".join(t.replace("|", TAG_BAR) for t in tags) + "|" if tags else ""


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


# --- preparing rows ---------------------------------------------------------------------------------
#
# A good record becomes a "prepared" tuple: its number among the good records of the file (from 0),
# then the database values that vary per example: source_line, messages JSON, chosen, rejected, tags
# JSON, tags_text, split. Position (the dataset's next position + the number) and token count are added by
# the importing process. A batch is a pair: the prepared tuples of up to STUDIO_IMPORT_BATCH good
# records, and the parsing.Rejection objects met on the way (each list in file order), so that the
# importing process hands the first list to the database as it is, without a loop over its rows.

Prepared = tuple
Batch = tuple[list[Prepared], list[parsing.Rejection]]


# The first batch is small and the next ones grow fourfold up to STUDIO_IMPORT_BATCH, so that the
# importing process starts inserting a few milliseconds after the helper starts, not a whole batch later.
FIRST_BATCH = 64
TRAIN = Example.Split.TRAIN.value  # the split of a record that names none


def prepare_batches(items: Iterable[parsing.Record | parsing.Rejection], batch_size: int) -> Iterator[Batch]:
    limit = min(batch_size, FIRST_BATCH)
    tag_columns: dict[tuple[str, ...], tuple[str, str]] = {}  # tags -> (JSON, tags_text): few distinct ones
    good: list[Prepared] = []
    rejected: list[parsing.Rejection] = []
    number = 0
    for item in items:
        if type(item) is parsing.Rejection:
            rejected.append(item)
            continue
        key = tuple(item.tags)
        tag_values = tag_columns.get(key)
        if tag_values is None:
            if len(tag_columns) > 10_000:
                tag_columns.clear()
            tag_values = tag_columns[key] = (json_text(item.tags), tags_text(item.tags))
        messages = item.messages_json if type(item) is parsing.JsonRecord else json_text(item.messages)
        good.append(
            (number, item.line, messages, item.chosen, item.rejected, *tag_values, item.split or TRAIN)
        )
        number += 1
        if len(good) >= limit:
            yield good, rejected
            good, rejected = [], []
            limit = min(batch_size, limit * 4)
    if good or rejected:
        yield good, rejected


def _prepared_record(p: Prepared) -> parsing.Record:
    """The record back from its prepared values (for token counting)."""
    return parsing.Record(p[1], orjson.loads(p[2]), orjson.loads(p[5]), p[3], p[4], p[7])


class _Source:
    """Prepared batches of an upload, parsed in this process."""

    encrypted = False  # whether the original upload was encrypted to its destination on the way

    def __init__(self, path: str, parse_args: dict, batch_size: int):
        self._batches = prepare_batches(parsing.parse_file(path, **parse_args), batch_size)

    def batches(self) -> Iterator[Batch]:
        return self._batches

    def finish(self) -> None:
        """After the import: wait for work still running beside it."""

    def close(self) -> None:
        """Stop whatever still runs (after a failure)."""


class _ForkedSource(_Source):
    """Prepared batches from a forked helper process, so that this process only inserts while a
    second core parses, validates and serialises: the helper prepares batch n+1 while batch n is inserted.
    A second forked helper encrypts the original meanwhile (the CPU left over on both cores).
    Frames are pickled tuples on a pipe; the helpers never touch the database. Fork (not spawn)
    keeps them cheap: they share the loaded code and settings."""

    PIPE_BYTES = 1 << 20

    def __init__(self, path: str, parse_args: dict, batch_size: int, encrypt_to: Path | None):
        self._pids: list[int] = []
        self._progress = parse_args.get("progress")
        try:
            if encrypt_to is not None:  # forked before the pipe exists, so it holds no end of it
                self._encryptor = forking.fork(lambda: storage.encrypt_file(Path(path), encrypt_to))
                self._pids.append(self._encryptor)
            read_fd, write_fd = os.pipe()
            with contextlib.suppress(OSError, AttributeError):  # Linux: room for about one batch
                fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, self.PIPE_BYTES)
            preparer = forking.fork(lambda: _prepare_into(read_fd, write_fd, path, parse_args, batch_size))
            self._pids.append(preparer)
            os.close(write_fd)
            self._in = os.fdopen(read_fd, "rb", buffering=self.PIPE_BYTES)
            frame = self._next()
            if frame[0] == "file_error":
                raise parsing.FileError(*frame[1:])
        except BaseException:
            self.close()
            raise

    def _next(self) -> tuple:
        while True:
            try:
                frame = pickle.load(self._in)  # noqa: S301 - from our own forked process
            except EOFError:
                raise RuntimeError("the import helper process stopped unexpectedly") from None
            if frame[0] != "progress":
                return frame
            if self._progress is not None:
                self._progress(*frame[1:])

    def batches(self) -> Iterator[Batch]:
        while (frame := self._next())[0] == "batch":
            yield frame[1], frame[2]
        if frame[0] != "parsed":
            raise RuntimeError(f"the import helper sent {frame[0]!r} before the end of the file")

    def finish(self) -> None:
        """Wait for the helpers; ``encrypted`` tells whether the encryptor completed."""
        self._in.close()
        statuses = {}
        for pid in self._pids:
            with contextlib.suppress(ChildProcessError):
                statuses[pid] = os.waitpid(pid, 0)[1]
        self._pids = []
        self.encrypted = hasattr(self, "_encryptor") and statuses.get(self._encryptor) == 0
        if hasattr(self, "_encryptor") and not self.encrypted:
            log.warning("import helper did not encrypt the original; encrypting in the worker")

    def close(self) -> None:
        for pid in self._pids:
            forking.stop(pid)
        self._pids = []
        if hasattr(self, "_in"):
            self._in.close()


def _prepare_into(read_fd: int, write_fd: int, path: str, parse_args: dict, batch_size: int) -> None:
    """The preparing helper: frames ("ready" | "file_error", ...), ("batch", good rows, rejections)...,
    ("parsed",), with ("progress", done, total) between them."""
    os.close(read_fd)
    with os.fdopen(write_fd, "wb", buffering=_ForkedSource.PIPE_BYTES) as out:

        def send(*frame) -> None:
            pickle.dump(frame, out, protocol=pickle.HIGHEST_PROTOCOL)

        def progress(done: int, total: int) -> None:
            send("progress", done, total)

        try:
            records = parsing.parse_file(path, **{**parse_args, "progress": progress})
        except parsing.FileError as exc:
            send("file_error", exc.code, exc.reason, exc.line)
            return
        send("ready")
        out.flush()  # the importing process opens its transaction while the first batch is prepared
        for good, rejected in prepare_batches(records, batch_size):
            send("batch", good, rejected)
            out.flush()
        send("parsed")


# Below this size the helper's fork and pipe cost more than the second core gains.
HELPER_MIN_BYTES = 4 * 1024 * 1024


def _open_source(upload: Upload, parse_args: dict, batch_size: int) -> _Source:
    """Raises parsing.FileError for a whole-file problem."""
    path = upload.raw_path
    encrypt_to = None
    if settings.STUDIO_ORIGINAL_UPLOADS == "encrypt":
        encrypt_to = storage.data_path("uploads", "originals", f"{upload.pk}.enc")
    if os.path.getsize(path) >= HELPER_MIN_BYTES and forking.fork_is_safe():
        return _ForkedSource(path, parse_args, batch_size, encrypt_to)
    return _Source(path, parse_args, batch_size)


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
    "split",
    "token_count",
)


def _fixed_columns(dataset: Dataset, upload: Upload, connection, now=None) -> tuple[list[str], tuple]:
    """(column names, database values) of the columns every example of a batch shares; ``now``: the
    import's time (created_at, updated_at), the current time if not given."""
    now = now or timezone.now()
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
    dataset: Dataset,
    upload: Upload,
    prepared: list[Prepared],
    start: int,
    token_counts: list[int] | None,
    now=None,
) -> None:
    """Insert the examples of a batch at positions ``start``, ``start + 1``, ..., with the values
    ``Example.objects.bulk_create`` would write (JSON as orjson text), but without building model
    instances: multi-row INSERT statements on SQLite, ``COPY`` on PostgreSQL. ``token_counts`` None:
    all 0. ``now``: the import's time, the same for every batch (on SQLite a time is a literal in the
    statement's text: one text for all batches, so the sqlite3 module's statement cache holds one
    compiled statement, not one per batch). Runs inside the import's transaction."""
    if not prepared:
        return
    connection = connections[router.db_for_write(Example)]
    fixed_names, fixed = _fixed_columns(dataset, upload, connection, now)
    names = [Example._meta.get_field(name).column for name in _ROW_COLUMNS] + fixed_names
    if (
        connection.vendor == "sqlite"
        and token_counts is None
        and prepared[-1][0] - prepared[0][0] == len(prepared) - 1
    ):
        # the usual case: the prepared tuples are bound as they are, their number + offset is the position
        _sqlite_insert(connection, names, prepared, f"?+{int(start - prepared[0][0])}", "0", fixed)
        return
    counts = token_counts if token_counts is not None else [0] * len(prepared)
    rows = [(start + i, *p[1:], n) for i, (p, n) in enumerate(zip(prepared, counts, strict=True))]
    if connection.vendor == "sqlite":
        _sqlite_insert(connection, names, rows, "?", "?", fixed)
        return
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            qn = connection.ops.quote_name
            sql = f"COPY {qn(Example._meta.db_table)} ({', '.join(qn(c) for c in names)}) FROM STDIN"
            with connection.wrap_database_errors, cursor.cursor.copy(sql) as copy:
                for row in rows:
                    copy.write_row((*row, *fixed))
        else:
            sql = insert_sql(connection, Example._meta.db_table, names)
            cursor.executemany(sql, [(*row, *fixed) for row in rows])


def _sqlite_insert(connection, names: list[str], rows: list[tuple], position: str, tokens: str, fixed):
    """Insert ``rows`` (source_line ... split, between a first and a last value that the SQL
    expressions ``position`` and ``tokens`` bind or replace) ROWS_PER_STATEMENT rows per statement
    (studio.db). The values every row shares are SQL literals (quoted by Django's schema editor, as
    in migrations), which saves binding a dozen parameters per row.

    The table's CHECK constraints are skipped for these rows (a third of the insert's time goes to
    re-parsing every messages text for ``JSON_VALID``): the JSON texts come from orjson or msgspec
    and the integers from counting, so no check can fail. NOT NULL and UNIQUE still apply; foreign
    keys are not checked during an import either (see _parents_held)."""
    quote = connection.schema_editor().quote_value
    values = f"{position}, ?, ?, ?, ?, ?, ?, ?, {tokens}, {', '.join([quote(v) for v in fixed])}"
    table = Example._meta.db_table
    with connection.cursor() as cursor, connection.wrap_database_errors:
        raw = cursor.cursor
        raw.execute("PRAGMA ignore_check_constraints = ON")
        try:
            insert_in_statements(raw, lambda n: insert_sql(connection, table, names, values, n), rows)
        finally:
            raw.execute("PRAGMA ignore_check_constraints = OFF")


def process(upload_id: int) -> ImportResult | None:
    """Validate and import an upload. Returns None if someone else holds it."""
    upload = claim(upload_id)
    if upload is None:
        log.info("upload %s not claimable (already processed or being processed)", upload_id)
        return None
    dataset = upload.dataset
    attempt = upload.attempts  # a requeued upload is taken again with attempts + 1: this one then stops
    rejections = _Rejections(upload)
    batch_size = settings.STUDIO_IMPORT_BATCH
    mapping = parsing.CsvMapping(**upload.csv_mapping) if upload.csv_mapping else None
    imported = 0
    source: _Source | None = None
    try:
        count_tokens, context = _token_counter(dataset)

        last_report = 0.0

        def report_progress(done: int, total: int) -> None:
            nonlocal last_report
            now = time.monotonic()
            if now - last_report >= PROGRESS_INTERVAL or done >= total:  # a few times a second is enough
                last_report = now
                progress.set_progress("upload", upload.pk, "Validating and importing", done, total)

        parse_args = {
            "fmt": upload.format or None,
            "kind": dataset.kind,
            "csv_mapping": mapping,
            "progress": report_progress,
        }
        source = _open_source(upload, parse_args, batch_size)
        with _parents_held(), transaction.atomic(), _objects_frozen():
            locked = Dataset.objects.select_for_update().get(pk=dataset.pk)
            held = Upload.objects.select_for_update().get(pk=upload.pk)  # both parents exist (_parents_held)
            if held.status != Upload.Status.PROCESSING or held.attempts != attempt:
                raise _Superseded
            position, now = locked.next_position, timezone.now()
            for good, rejected in source.batches():
                for item in rejected:
                    rejections.add(item.line, item.code, item.reason, item.raw)
                counts = None
                if count_tokens is not None:
                    good, counts = _within_context(good, count_tokens, context, dataset, rejections)
                _insert_examples(locked, upload, good, position, counts, now=now)
                position += len(good)
                imported += len(good)
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
    except _Superseded:
        _close(source)
        rejections.writer.close(keep=False)
        log.warning(
            "upload %s attempt %s was superseded by a newer attempt; it changed nothing", upload.pk, attempt
        )
        return None
    except (parsing.FileError, ImportRefused) as exc:
        _close(source)
        if not _claimed(upload.pk, attempt).exists():  # a newer attempt owns the upload now
            rejections.writer.close(keep=False)
            return None
        if isinstance(exc, parsing.FileError):
            _refuse(upload, rejections, exc.reason, {"code": exc.code, "line": exc.line})
        else:
            _refuse(upload, rejections, str(exc), None)
        return ImportResult(upload, 0, rejections.total, rejections.first)
    except BaseException:
        _close(source)
        checkpoint_wal()  # the rolled-back rows' text must not stay in SQLite's write-ahead log
        log.exception("upload %s failed", upload.pk)
        rejections.writer.close(keep=False)
        mine = _claimed(upload.pk, attempt).update(
            status=Upload.Status.FAILED,
            error="The import failed unexpectedly and nothing was added. An engineer can find the "
            f"details in the worker log (upload {upload.pk}).",
            finished_at=timezone.now(),
        )
        if mine:  # else a newer attempt owns the upload (and its file): leave both to it
            progress.clear_progress("upload", upload.pk)
            _dispose_original(upload)
        raise
    source.finish()
    _dispose_original(upload, encrypted=source.encrypted)
    progress.clear_progress("upload", upload.pk)
    helper = isinstance(source, _ForkedSource)
    log.info("upload %s imported=%s rejected=%s helper=%s", upload.pk, imported, rejections.total, helper)
    return ImportResult(upload, imported, rejections.total, rejections.first)


class _Superseded(Exception):
    """The watchdog requeued this upload and a newer attempt took it: this one must change nothing."""


def _claimed(upload_id: int, attempt: int):
    """The upload's row while this attempt still owns it (an empty queryset once a newer one took it)."""
    return Upload.objects.filter(pk=upload_id, status=Upload.Status.PROCESSING, attempts=attempt)


def _parents_held() -> contextlib.AbstractContextManager:
    """On SQLite, the import's transaction runs without per-row foreign key checks, as Django's
    ``loaddata`` does (they were about 30% of the insert's time: two parent lookups per example).
    Every example of an import references the same dataset and upload, which the transaction reads
    after taking the database's write lock (``transaction_mode`` IMMEDIATE): no other connection can
    delete them before it commits, so no check could fail. The pragma only changes outside a
    transaction: inside an enclosing one (tests) the checks simply stay on."""
    connection = connections[router.db_for_write(Example)]
    if connection.vendor != "sqlite":
        return contextlib.nullcontext()
    return connection.constraint_checks_disabled()


@contextlib.contextmanager
def _objects_frozen():
    """While the rows stream through, the garbage collector leaves the objects that existed before
    alone (a worker process holds hundreds of thousands: full collections would scan them all
    several times per import). They are handed back to it afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _close(source: _Source | None) -> None:
    if source is not None:
        source.close()


def _within_context(
    good: list[Prepared], count_tokens, context: int, dataset: Dataset, rejections: _Rejections
):
    """The prepared records that fit the base model's context and their token counts; the others are
    rejected as "too_long", or as "template_refused" when the base model's chat template refuses to
    render them (e.g. a system message for a template without a system role): training could not
    render them either."""
    records = [_prepared_record(p) for p in good]
    try:
        all_counts: list[int | None] = list(count_tokens(records))
    except TemplateError:
        all_counts = [_count_or_refuse(rec, count_tokens, dataset, rejections) for rec in records]
        if all(n is not None for n in all_counts):
            raise  # each renders on its own: not a refusal of one record, a fault
    kept, counts = [], []
    for p, rec, n in zip(good, records, all_counts, strict=True):
        if n is None:
            continue
        if n > context:
            rejections.add(
                rec.line,
                "too_long",
                f"the conversation is {n} tokens long; the base model "
                f"{dataset.base_model.name} takes at most {context}. Shorten or split it.",
                _record_bytes(rec),
            )
            continue
        kept.append(p)
        counts.append(n)
    return kept, counts


def _count_or_refuse(
    rec: parsing.Record, count_tokens, dataset: Dataset, rejections: _Rejections
) -> int | None:
    """One record's token count, or None after rejecting it because the chat template refuses it (the
    template's own words, which name roles or rules, never the record's text)."""
    try:
        return count_tokens([rec])[0]
    except TemplateError as exc:
        rejections.add(
            rec.line,
            "template_refused",
            f"the base model {dataset.base_model.name}'s chat template refuses this conversation (it says: "
            f'"{str(exc)[:200]}"). Change the conversation (often: remove or merge the system message), or '
            "import it into a dataset with another base model.",
            _record_bytes(rec),
        )
        return None


def _finish(upload: Upload, imported: int, rejections: _Rejections, error: str = "", file_error=None) -> None:
    """Record the outcome. Reasons that may quote the file's content (every line's reason, and a
    whole-file refusal's: ``file_error`` given) are stored sealed (encrypted); the rest in clear."""
    upload.imported_count = imported
    upload.rejected_count = rejections.total
    upload.rejects_path = rejections.close()
    first = [{"line": r["line"], "code": r["code"]} for r in rejections.first]
    upload.report = {"counts": dict(rejections.counts), "first": first}
    secret = {"reasons": [r["reason"] for r in rejections.first]}
    if file_error:
        upload.report["file_error"] = {"code": file_error["code"], "line": file_error["line"]}
        secret["error"] = error
        error = FILE_REFUSED
    upload.sealed = storage.seal(secret) if secret["reasons"] or "error" in secret else ""
    if upload.format == "" and upload.status == Upload.Status.IMPORTED:
        with contextlib.suppress(parsing.FileError):
            upload.format = parsing.detect_format(upload.raw_path)
    upload.error = error
    upload.finished_at = timezone.now()
    upload.save()


FILE_REFUSED = "The file was refused as a whole; the reason is on the upload's page."


def _refuse(upload: Upload, rejections: _Rejections, reason: str, file_error) -> None:
    checkpoint_wal()  # rows inserted before the refusal were rolled back: drop them from the WAL too
    upload.status = Upload.Status.REJECTED
    _finish(upload, 0, rejections, error=reason, file_error=file_error)
    _dispose_original(upload)
    progress.clear_progress("upload", upload.pk)
    log.info("upload %s rejected whole (%s rejected lines)", upload.pk, rejections.total)


def _dispose_original(upload: Upload, encrypted: bool = False) -> None:
    """No raw personal data at rest: encrypt the original (or delete it, per setting). ``encrypted``:
    the import helper has already written the encrypted copy."""
    raw = Path(upload.raw_path) if upload.raw_path else None
    if raw is None or not raw.exists():
        return
    stored = ""
    if settings.STUDIO_ORIGINAL_UPLOADS == "encrypt":
        dest = storage.data_path("uploads", "originals", f"{upload.pk}.enc")
        if not (encrypted and dest.exists()):
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
            with transaction.atomic():
                gave_up = Upload.objects.filter(
                    pk=upload.pk, status=Upload.Status.PROCESSING, started_at__lt=cutoff
                ).update(
                    status=Upload.Status.FAILED,
                    error=f"The import was interrupted {upload.attempts} times (worker stopped); nothing was "
                    "added. Upload the file again, or ask an engineer to check the workers.",
                    finished_at=timezone.now(),
                )
                if gave_up:
                    audit.record(None, "upload.fail", upload.dataset, upload=upload.pk, reason="worker_lost")
            if gave_up:
                _dispose_original(upload)  # no plaintext original left behind
            continue
        # still the stale attempt (started before the cutoff): a redelivered task that claimed it again
        # meanwhile has a fresh started_at and is left to run
        if Upload.objects.filter(pk=upload.pk, status=Upload.Status.PROCESSING, started_at__lt=cutoff).update(
            status=Upload.Status.QUEUED
        ):
            requeued.append(upload.pk)
            # broker down: failed with a reason, not left queued with no message behind it
            transaction.on_commit(lambda upload=upload: quietly(lambda: _send(upload)))
    return requeued
