"""Errors a person can act on, in plain words, and :func:`explain` to map raw exceptions onto them."""

from __future__ import annotations

import errno


class TrainerError(Exception):
    """A training failure with a short ``code``, a plain ``message`` and a ``suggestion`` for what to do."""

    code = "internal"
    default_suggestion = "Look at the job log for details, or ask an engineer."

    def __init__(self, message: str, suggestion: str | None = None):
        super().__init__(message)
        self.message = message
        self.suggestion = suggestion if suggestion is not None else self.default_suggestion

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "suggestion": self.suggestion}

    def __str__(self) -> str:
        return f"{self.message} {self.suggestion}".strip()


class ConfigError(TrainerError):
    code = "config"
    default_suggestion = "Fix the training settings and start the job again."


class OutOfMemory(TrainerError):
    code = "oom"
    default_suggestion = "Use a smaller batch size, a shorter max length, or QLoRA."


class DiskFull(TrainerError):
    code = "disk_full"
    default_suggestion = (
        "Free some disk space (or delete old jobs), then press “Resume from checkpoint” on the job page: "
        "earlier checkpoints are intact. If it had written none yet, launch it again."
    )


class CorruptCheckpoint(TrainerError):
    code = "corrupt_checkpoint"
    default_suggestion = (
        "Delete the damaged checkpoint folder to resume from the one before it, or restart the job."
    )

    def __init__(self, message: str, suggestion: str | None = None, checkpoint: str | None = None):
        super().__init__(message, suggestion)
        self.checkpoint = checkpoint


class DataError(TrainerError):
    code = "data"
    default_suggestion = "Fix the training file (or pick another dataset version) and start the job again."


_OOM_MARKERS = (
    "cuda out of memory",
    "out of memory",
    "defaultcpuallocator: can't allocate",
    "can't allocate memory",
    "cublas_status_alloc_failed",
    "mps backend out of memory",
)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _OOM_MARKERS)


def _is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "no space left on device" in text or "disk quota exceeded" in text


def explain(exc: BaseException) -> TrainerError:
    """Map any exception raised while training onto a :class:`TrainerError` a person can act on."""
    if isinstance(exc, TrainerError):
        return exc
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # look through chained causes too
        seen.add(id(current))
        if _is_oom(current):
            return OutOfMemory("Training ran out of memory.")
        if _is_enospc(current):
            return DiskFull("The disk is full: a checkpoint or artifact could not be written.")
        if isinstance(current, TrainerError):
            return current
        current = current.__cause__ or current.__context__
    if isinstance(exc, FileNotFoundError):
        return ConfigError(f"A file the job needs is missing: {exc.filename or exc}.")
    return TrainerError(f"Training failed unexpectedly ({type(exc).__name__}).")
