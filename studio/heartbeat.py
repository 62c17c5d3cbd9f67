"""The heartbeat thread shared by training jobs and evaluation runs (same claim scheme)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import QuerySet
from django.utils import timezone

log = logging.getLogger(__name__)


class Heartbeat:
    """Stamps `heartbeat_at` on the claimed row every STUDIO_JOB_HEARTBEAT_SECONDS from a daemon thread,
    independent of how long a step or batch takes; it dies with the process. `lost` turns True once the
    row is no longer this attempt's (requeued by the watchdog, cancelled or finished elsewhere)."""

    def __init__(self, claimed: Callable[[], QuerySet], label: str):
        self._claimed = claimed
        self._label = label
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"{label}-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _beat(self) -> None:
        failing = False
        try:
            while not self._stop.wait(settings.STUDIO_JOB_HEARTBEAT_SECONDS):
                try:
                    if not self._claimed().update(heartbeat_at=timezone.now()):
                        self.lost = True
                except DatabaseError as error:
                    # A database blip (a dropped connection, a lock timeout) must not end the beat:
                    # a silent heartbeat gets the live work requeued by the watchdog and run twice.
                    # Drop the broken connection; the next beat opens a new one.
                    if not failing:
                        log.warning("%s heartbeat failed (%s); retrying", self._label, type(error).__name__)
                    failing = True
                    connection.close()
                else:
                    if failing:
                        log.info("%s heartbeat recovered", self._label)
                    failing = False
        except Exception:  # the main thread notices a broken database on its next write
            log.exception("%s heartbeat failed", self._label)
        finally:
            connection.close()
