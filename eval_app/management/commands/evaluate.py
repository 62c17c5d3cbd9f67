"""python manage.py evaluate --version ID --baseline base|production|VERSION_ID --dataset-version ID
[--split golden|eval] [--max-new-tokens N] [--temperature T] [--seed S] [--batch-size B] [--limit N]
[--wait] [--by USERNAME]

Queues an evaluation run for the gpu workers and prints `run N`; with --wait it runs here and prints the
metrics and the PII-leak count, the run id last. Exit status 1 with the reasons on refusal or failure.
"""

from __future__ import annotations

import json

from django.core.management.base import CommandError

from datasets_app.models import DatasetVersion
from studio.cli import StudioCommand, acting_engineer

from ...models import EvalRun, ModelVersion
from ...services import evaluation


class Command(StudioCommand):
    help = "Evaluate a candidate version against a baseline (and with --wait, run it here)."

    def create_parser(self, prog_name, subcommand, **kwargs):
        # `--version ID` names the candidate here; it replaces Django's "print Django's version" flag
        return super().create_parser(prog_name, subcommand, conflict_handler="resolve", **kwargs)

    def add_arguments(self, parser):
        parser.add_argument("--version", type=int, required=True, help="candidate model version id")
        parser.add_argument(
            "--baseline", default="base", help="base (its base model), production, or a version id"
        )
        parser.add_argument("--dataset-version", type=int, required=True, help="dataset version id")
        parser.add_argument("--split", choices=evaluation.SPLITS, default="golden")
        parser.add_argument("--max-new-tokens", type=int)
        parser.add_argument("--temperature", type=float)
        parser.add_argument("--seed", type=int)
        parser.add_argument("--batch-size", type=int)
        parser.add_argument("--limit", type=int, help="only the first N examples of the split")
        parser.add_argument("--wait", action="store_true", help="run the evaluation here")
        parser.add_argument("--by", default="", help="engineer starting it (default: the first admin)")

    def handle(self, *args, **opts):
        user = acting_engineer(opts["by"], "start evaluations")
        candidate = ModelVersion.objects.filter(pk=opts["version"]).first()
        if candidate is None:
            raise CommandError(f"Model version {opts['version']} does not exist.")
        dataset_version = DatasetVersion.objects.filter(pk=opts["dataset_version"]).first()
        if dataset_version is None:
            raise CommandError(f"Dataset version {opts['dataset_version']} does not exist.")
        baseline_version = None
        baseline = opts["baseline"]
        if baseline.isascii() and baseline.isdigit():
            baseline_version = ModelVersion.objects.filter(pk=int(baseline)).first()
            if baseline_version is None:
                raise CommandError(f"Baseline model version {baseline} does not exist.")
            kind = EvalRun.BaselineKind.VERSION
        elif baseline in (EvalRun.BaselineKind.BASE, EvalRun.BaselineKind.PRODUCTION):
            kind = baseline
        else:
            raise CommandError("--baseline must be base, production or a model version id.")
        params = {
            key: opts[key]
            for key in ("max_new_tokens", "temperature", "seed", "batch_size", "limit")
            if opts[key] is not None
        }
        try:
            run = evaluation.create_run(
                user,
                candidate,
                kind,
                dataset_version,
                split=opts["split"],
                baseline_version=baseline_version,
                enqueue=not opts["wait"],
                **params,
            )
        except evaluation.EvalRefused as exc:
            raise CommandError("\n".join(exc.problems))
        self.stdout.write(f"run {run.pk}")
        if not opts["wait"]:
            return
        run = evaluation.execute_run(run.pk)
        if run is None:
            raise CommandError("The run was taken by another process; follow it in the studio.")
        if run.state != EvalRun.State.SUCCEEDED:
            raise CommandError(f"Run {run.pk} {run.state}: {run.error_message or 'no result'}")
        for side in ("candidate", "baseline"):
            self.stdout.write(f"{side}: {json.dumps(run.metrics.get(side), sort_keys=True)}")
        self.stdout.write(f"comparisons: {run.comparisons.count()}")
        self.stdout.write(f"pii leaks: {run.pii_leaks}")
        self.stdout.write(str(run.pk))
