"""Command line: run one training job from a JSON config and print progress as JSON lines.

Single process (CPU or one GPU)::

    python -m training_app.trainer --config job.json

Several GPUs on one node (data parallel; transformers' Trainer / accelerate set up DDP, only rank 0
prints progress and writes artifacts)::

    torchrun --nproc_per_node=4 -m training_app.trainer --config job.json
    accelerate launch --num_processes 4 -m training_app.trainer --config job.json

``job.json`` holds the fields of :class:`training_app.trainer.config.TrainConfig`, e.g.
``{"method": "lora", "model_dir": "/models/smollm2", "output_dir": "/jobs/42", "train_path": "/jobs/42/train.jsonl",
"max_steps": 200}``.  Running the same command again resumes from the newest checkpoint in ``output_dir``.
Each line printed is a JSON object with an ``event`` key: ``start``, ``step``, ``eval``, ``checkpoint``,
``log``, then ``result`` (or ``error`` with ``code``/``message``/``suggestion``; exit status 1 — 2 for
invalid settings).  Add ``--validate`` to only check the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .callbacks import JsonLinesReporter, Reporter
from .config import TrainConfig
from .errors import ConfigError, TrainerError, explain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training_app.trainer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", required=True, help="path to the job's JSON config (TrainConfig fields)")
    parser.add_argument("--validate", action="store_true", help="only check the settings")
    args = parser.parse_args(argv)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    reporter: Reporter = JsonLinesReporter() if main_rank else Reporter()

    def emit(event: str, **data) -> None:
        if main_rank:
            print(json.dumps({"event": event, **data}, default=float), flush=True)

    try:
        with open(args.config, encoding="utf-8") as fh:
            config = TrainConfig.from_dict(json.load(fh))
    except (OSError, ValueError, TypeError) as exc:
        emit("error", code="config", message=f"The config file could not be read ({exc}).", suggestion="")
        return 2
    except ConfigError as exc:
        emit("error", **exc.as_dict())
        return 2
    if args.validate:
        problems = config.validate()
        emit("validate", ok=not problems, problems=problems)
        return 0 if not problems else 2
    from .run import run_training

    try:
        result = run_training(config, reporter)
    except TrainerError as exc:
        emit("error", **exc.as_dict())
        return 2 if isinstance(exc, ConfigError) else 1
    except Exception as exc:  # explain() already ran inside run_training; this is a last resort
        emit("error", **explain(exc).as_dict())
        return 1
    emit(
        "result",
        status=result.status,
        steps=result.steps,
        total_steps=result.total_steps,
        resumed_from_step=result.resumed_from_step,
        artifacts_dir=result.artifacts_dir,
        last_checkpoint=result.last_checkpoint,
        final_metrics=result.final_metrics,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
