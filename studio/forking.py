"""Forked helper processes: the second core of a worker for CPU-bound work (imports, PII scans).

Fork, not spawn: a child shares the loaded code, settings and models (spaCy's included) for free.
Only a single-threaded process is forked (a lock another thread held at the fork would stay held
forever in the child); everything else runs in the calling process instead. Children never touch
the database, and report failures by their kind only (messages can quote user text).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import signal
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def fork_is_safe() -> bool:
    """Whether this process may fork a helper: it can fork and runs a single thread. (A Celery
    prefork worker process runs its tasks on one thread.)"""
    return hasattr(os, "fork") and threading.active_count() == 1


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def fork(target: Callable[[], None]) -> int:
    """Run ``target`` in a forked child that exits with 0 when it returns, 1 when it raises."""
    pid = os.fork()
    if pid:
        return pid
    code = 1  # pragma: no cover - below runs in the child (coverage does not follow forks)
    gc.freeze()  # pragma: no cover - the inherited objects live until exit: no collection scans them
    try:  # pragma: no cover
        target()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - report the kind only: messages can quote user text
        with contextlib.suppress(Exception):
            os.write(2, f"helper process stopped: {type(exc).__name__}\n".encode())
    finally:
        os._exit(code)


def stop(pid: int) -> None:
    """Kill and reap a child (no error if it is already gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def split_map(
    fn: Callable[[list[T]], list[R]], items: Sequence[T], processes: int, *, min_per_process: int = 1
) -> list[R]:
    """``fn(items)`` computed as up to ``processes`` contiguous slices side by side (each of at least
    ``min_per_process`` items): the first slice in this process, the others in forked children whose
    results come back pickled through pipes. The results are concatenated in order, so the answer is
    ``fn(items)`` for any ``fn`` that maps each item independently. A child that fails has its slice
    recomputed here (with a warning in the log): a failure costs time, never a result. With one
    process, too few items or a process that may not fork, it is simply ``fn(items)``."""
    items = list(items)
    processes = min(processes, len(items) // max(min_per_process, 1))
    if processes < 2 or not fork_is_safe():
        return fn(items)
    log.info("splitting %d items over %d processes (%d forked)", len(items), processes, processes - 1)
    bounds = [len(items) * i // processes for i in range(processes + 1)]
    slices = [items[bounds[i] : bounds[i + 1]] for i in range(processes)]
    children: list[tuple[int, int]] = []  # (pid, read end of its pipe), until its result is read
    try:
        for part in slices[1:]:
            read_fd, write_fd = os.pipe()
            try:
                pid = fork(lambda part=part, r=read_fd, w=write_fd: _send(fn, part, r, w))
            except BaseException:
                os.close(read_fd)
                raise
            finally:
                os.close(write_fd)
            children.append((pid, read_fd))
        results = [fn(slices[0])]
        for part in slices[1:]:
            pid, read_fd = children.pop(0)
            try:
                with os.fdopen(read_fd, "rb") as pipe:
                    data = pipe.read()
            finally:
                status = os.waitpid(pid, 0)[1]
            value = pickle.loads(data) if status == 0 and data else None  # noqa: S301 - our own child
            if value is None or len(value) != len(part):
                log.warning("helper process %s failed (status %s); computing its part here", pid, status)
                value = fn(part)
            results.append(value)
    finally:
        for pid, read_fd in children:  # left only when this process failed first
            stop(pid)
            os.close(read_fd)
    return [value for part in results for value in part]


def _send(fn, part: list, read_fd: int, write_fd: int) -> None:  # pragma: no cover - in the child
    os.close(read_fd)
    data = pickle.dumps(fn(part), protocol=pickle.HIGHEST_PROTOCOL)
    with os.fdopen(write_fd, "wb") as out:
        out.write(data)
