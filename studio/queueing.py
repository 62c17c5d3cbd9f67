"""Sending a task for a row that is already committed in the queued state, and cancelling such a row.

The database is the queue of record and the watchdog only rescues *running* work, so a row left queued
with no broker message behind it would never run (or, for training jobs, would take the next launch's
message). When the broker is unreachable the row fails at once with a reason, and the error propagates so
the person gets the 503 page.
"""

from __future__ import annotations

from collections.abc import Callable

from django.db.models import QuerySet


def send_or_fail(send: Callable[[], object], still_queued: QuerySet, failed: dict, on_failed=None) -> None:
    """Call `send()`; if the broker is unreachable, update the rows of `still_queued` (a queryset already
    filtered to the queued state) with `failed`, call `on_failed()` if a row changed, and re-raise."""
    from kombu.exceptions import OperationalError as BrokerError

    try:
        send()
    except BrokerError:
        if still_queued.update(**failed) and on_failed is not None:
            on_failed()
        raise


def cancel_or_flag(rows: QuerySet, queued: str, running: str, cancelled: str, now) -> str | None:
    """Cancel the queued row of `rows` (one row, by pk) at once, or flag a running one for its worker to
    stop at its next check, with conditional UPDATEs so a worker's claim and a cancel never both win.
    Returns "cancelled", "cancel requested", or None when the row had already finished."""
    if rows.filter(state=queued).update(state=cancelled, finished_at=now, cancel_requested=True):
        return "cancelled"
    if rows.filter(state=running).update(cancel_requested=True):
        return "cancel requested"
    return None


def quietly(send: Callable[[], object]) -> bool:
    """For the watchdog: `send()` (a send_or_fail call, which fails its row with a reason when the broker
    is unreachable); a broker error is logged instead of raised, so the rest of the round goes on."""
    import logging

    from kombu.exceptions import OperationalError as BrokerError

    try:
        send()
    except BrokerError:
        logging.getLogger(__name__).error(
            "watchdog: the broker is unreachable; the row was failed with a reason"
        )
        return False
    return True
