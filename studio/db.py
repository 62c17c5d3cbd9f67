"""Database helpers shared by the apps."""

from __future__ import annotations

import logging

from django.db import connection, transaction

log = logging.getLogger(__name__)


def purge_freed_pages() -> None:
    """After personal data was overwritten, make sure no copy of the old text stays in the database
    file. SQLite runs with `secure_delete=ON` (freed pages are zeroed); old page images can still sit
    in the write-ahead log until a checkpoint, so checkpoint and truncate it once the change commits.
    PostgreSQL keeps dead row versions until autovacuum reuses them: see the README (encrypted volume)."""

    transaction.on_commit(checkpoint_wal)


def checkpoint_wal() -> None:
    """Copy the write-ahead log into the database file and truncate it (SQLite; a no-op elsewhere).
    Also after a rolled-back write: the frames of an aborted transaction stay in the WAL file until
    it is reset, and an import's hold the raw text of every row it had inserted."""
    if connection.vendor != "sqlite" or connection.in_atomic_block:
        return
    try:
        with connection.cursor() as cur:
            cur.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except Exception:  # noqa: BLE001 - another reader holds the WAL: the next checkpoint gets it
        log.warning("WAL checkpoint deferred")
