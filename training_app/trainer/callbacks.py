"""Progress reporting hooks.  The Django side subclasses :class:`Reporter`; the CLI prints JSON lines."""

from __future__ import annotations

import json
import sys
from typing import TextIO


class Reporter:
    """No-op base class.  Every method is called from the rank-0 process only."""

    def on_start(
        self, *, total_steps: int, start_step: int, device: str, train_tokens: int, examples: int
    ) -> None:
        pass

    def on_step(self, *, step: int, total_steps: int, metrics: dict[str, float]) -> None:
        pass

    def on_eval(self, *, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, *, step: int, path: str) -> None:
        pass

    def on_log(self, line: str) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def may_publish(self) -> bool:
        """Asked just before the final artifacts replace the output dir's: False when this run no longer
        owns the job (a newer attempt took it over), so it must not overwrite that attempt's files."""
        return True


class JsonLinesReporter(Reporter):
    """Writes one JSON object per event (used by ``python -m training_app.trainer``)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout

    def _emit(self, event: str, **data) -> None:
        self.stream.write(json.dumps({"event": event, **data}, default=float) + "\n")
        self.stream.flush()

    def on_start(self, *, total_steps, start_step, device, train_tokens, examples):
        self._emit(
            "start",
            total_steps=total_steps,
            start_step=start_step,
            device=device,
            train_tokens=train_tokens,
            examples=examples,
        )

    def on_step(self, *, step, total_steps, metrics):
        self._emit("step", step=step, total_steps=total_steps, metrics=metrics)

    def on_eval(self, *, step, metrics):
        self._emit("eval", step=step, metrics=metrics)

    def on_checkpoint(self, *, step, path):
        self._emit("checkpoint", step=step, path=path)

    def on_log(self, line):
        self._emit("log", line=line)
