"""Live progress of long tasks, shared between worker and web processes through the cache.

Progress is not written to the database on purpose: an import runs inside one transaction (all or
nothing), so rows it updates are invisible to the web process until it commits.
"""

from __future__ import annotations

import logging
import time

from django.core.cache import cache

TTL = 24 * 3600
log = logging.getLogger(__name__)


def _key(kind: str, obj_id: int) -> str:
    return f"progress:{kind}:{obj_id}"


def set_progress(kind: str, obj_id: int, phase: str, done: int, total: int) -> None:
    try:
        cache.set(_key(kind, obj_id), {"phase": phase, "done": done, "total": total, "at": time.time()}, TTL)
    except Exception as exc:  # noqa: BLE001 - progress is best-effort; never fail a task over it
        log.warning("progress not recorded for %s %s: %s", kind, obj_id, exc.__class__.__name__)


def get_progress(kind: str, obj_id: int) -> dict | None:
    try:
        value = cache.get(_key(kind, obj_id))
    except Exception:  # noqa: BLE001
        return None
    if value:
        total = value.get("total") or 0
        value["percent"] = round(100 * value["done"] / total, 1) if total else 0.0
    return value


def clear_progress(kind: str, obj_id: int) -> None:
    try:
        cache.delete(_key(kind, obj_id))
    except Exception as exc:  # noqa: BLE001
        log.warning("progress not cleared for %s %s: %s", kind, obj_id, exc.__class__.__name__)
