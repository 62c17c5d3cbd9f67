"""python manage.py train --dataset-version ID --base-model NAME --method sft|lora|qlora|dpo
[--max-steps N] [--preset NAME] [--wait] [--by USERNAME]

Enqueues a job for the gpu workers and prints its id; with --wait it runs the job here, printing
progress, and prints the model version id as its last line. Exit status 1 with the reason on failure.
"""

from __future__ import annotations

from django.core.management.base import CommandError

from datasets_app.models import DatasetVersion
from studio.cli import StudioCommand, acting_engineer

from ...models import BaseModel, TrainingJob
from ...presets import COMMON, PRESETS
from ...services import jobs


class Command(StudioCommand):
    help = "Launch a fine-tuning job (and with --wait, run it to the end here)."

    def add_arguments(self, parser):
        parser.add_argument("--dataset-version", type=int, required=True, help="frozen dataset version id")
        parser.add_argument("--base-model", required=True, help="base model name, e.g. SmolLM2-135M-Instruct")
        parser.add_argument("--method", choices=TrainingJob.Method.values, help="default: the preset's")
        parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a preset's settings")
        parser.add_argument("--max-steps", type=int)
        parser.add_argument("--model-name", default="", help="registry line (default: the dataset's name)")
        parser.add_argument("--priority", type=int, default=0)
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any setting")
        parser.add_argument("--wait", action="store_true", help="run the job here and print progress")
        parser.add_argument("--by", default="", help="engineer launching it (default: the first admin)")

    def handle(self, *args, **opts):
        user = acting_engineer(opts["by"], "launch training jobs")
        version = DatasetVersion.objects.filter(pk=opts["dataset_version"]).first()
        if version is None:
            raise CommandError(f"Dataset version {opts['dataset_version']} does not exist.")
        base = BaseModel.objects.filter(name=opts["base_model"]).first()
        if base is None:
            names = ", ".join(BaseModel.objects.values_list("name", flat=True)) or "none registered"
            raise CommandError(f"Base model “{opts['base_model']}” does not exist (available: {names}).")
        method, config = opts["method"] or "lora", dict(COMMON)
        if opts["preset"]:
            method, config = PRESETS[opts["preset"]]["method"], dict(PRESETS[opts["preset"]]["config"])
            method = opts["method"] or method
        # a preset's or the default max length is capped at the model's context; an explicit one is checked
        config["max_length"] = min(int(config["max_length"]), base.context_length)
        for item in opts["set"]:
            key, sep, value = item.partition("=")
            if not sep or key not in COMMON:
                raise CommandError(f"--set {item}: use KEY=VALUE with KEY one of {', '.join(COMMON)}.")
            config[key] = value
        if opts["max_steps"] is not None:
            config["max_steps"] = opts["max_steps"]
        request = jobs.JobRequest(
            dataset_version=version,
            base_model=base,
            method=method,
            config=config,
            model_name=opts["model_name"],
            preset=opts["preset"] or "",
            priority=opts["priority"],
        )
        try:
            job = jobs.create_job(request, user, enqueue=not opts["wait"])
        except jobs.JobRefused as exc:
            raise CommandError("\n".join(exc.problems))
        self.stdout.write(f"job {job.pk}")
        if not opts["wait"]:
            return
        claimed = jobs.claim(job.pk, jobs.hostname())
        if claimed is None:
            raise CommandError(f"Job {job.pk} was taken by another process; follow it in the studio.")
        job = jobs.run_claimed(claimed, echo=lambda line: self.stdout.write(line))
        if job.state != TrainingJob.State.SUCCEEDED:
            reason = job.error_message or f"the job ended {job.get_state_display().lower()}"
            hint = f" {job.error_suggestion}" if job.error_suggestion else ""
            raise CommandError(f"Job {job.pk} {job.state}: {reason}{hint}")
        self.stdout.write(str(job.model_version.pk))
