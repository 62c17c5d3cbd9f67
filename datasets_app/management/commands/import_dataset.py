"""Import a file into a (new or existing) dataset, through the same services as the UI."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import CommandError
from django.db import transaction

from studio.cli import StudioCommand
from training_app.models import BaseModel

from ...models import Dataset
from ...pii import DEFAULT_KEEP_PATTERNS, PiiPolicy
from ...services import datasets, duplicates, imports, scrub, versions


class Command(StudioCommand):
    help = "Import PATH into the dataset NAME (created if needed); prints the dataset id, or the version id with --freeze."

    def add_arguments(self, parser):
        parser.add_argument("path")
        parser.add_argument("--name", required=True)
        parser.add_argument("--kind", choices=["sft", "preference"], default="sft")
        parser.add_argument(
            "--format", choices=["openai", "sharegpt", "alpaca", "csv", "preference"], default=""
        )
        parser.add_argument("--csv-prompt", default="prompt", help="CSV column holding the prompt")
        parser.add_argument("--csv-response", default="response", help="CSV column holding the response")
        parser.add_argument("--base-model", default="", help="base model name (default: the studio default)")
        parser.add_argument("--scrub", action="store_true", help="apply every PII finding without review")
        parser.add_argument("--keep-pattern", action="append", default=[], help="regex never scrubbed")
        parser.add_argument("--freeze", action="store_true", help="freeze a version after importing")
        parser.add_argument("--user", default="", help="username recorded as the actor")

    path_options = ("path",)

    def handle(self, *args, **opts):
        from django.contrib.auth import get_user_model

        path = Path(opts["path"])
        if not path.is_file():
            raise CommandError(f"{path}: no such file")
        opts["name"] = opts["name"].strip()
        user = get_user_model().objects.filter(username=opts["user"]).first() if opts["user"] else None
        if opts["user"] and user is None:
            raise CommandError(f"--user: no user called “{opts['user']}”.")
        actor = user or "cli"
        try:
            with transaction.atomic():  # a file with no good line creates nothing, not even the dataset
                dataset, upload, result = self._import(path, opts, user, actor)
                if result.imported == 0:
                    raise _NothingImported(result)
        except _NothingImported as exc:
            for r in exc.result.rejections:
                self.stdout.write(f"line {r['line']}: {r['reason']}")
            imports.delete_upload_files(exc.result.upload)
            raise CommandError(exc.result.upload.error_text or "nothing could be imported")
        except (imports.ImportRefused, datasets.EditRefused) as exc:
            raise CommandError(str(exc))
        for r in result.rejections:
            self.stdout.write(f"line {r['line']}: {r['reason']}")
        if result.rejected > len(result.rejections):
            self.stdout.write(f"... and {result.rejected - len(result.rejections)} more rejected lines")
        duplicates.recompute(dataset)
        try:
            scrub.scan_examples(
                dataset, list(dataset.examples.filter(pii_status="unscanned").values_list("pk", flat=True))
            )
        except scrub.ScanStopped as exc:  # a keep-pattern too slow on one message: the import stays
            self.stderr.write(f"imported {result.imported}, rejected {result.rejected}")
            if opts["scrub"] or opts["freeze"]:
                raise CommandError(
                    f"imported into dataset {dataset.pk}, but the PII scan stopped: {exc}"
                ) from None
            self.stderr.write(f"the PII scan stopped: {exc}")
            self.stdout.write(str(dataset.pk))
            return
        if opts["scrub"]:
            scrub.apply_all(dataset, user)
        self.stderr.write(f"imported {result.imported}, rejected {result.rejected}")
        if opts["freeze"]:
            try:
                version = versions.freeze(
                    dataset, user, changelog=f"Imported {path.name} from the command line"
                )
            except versions.FreezeRefused as exc:
                raise CommandError(f"imported into dataset {dataset.pk}, but could not freeze: {exc}")
            self.stdout.write(str(version.pk))
        else:
            self.stdout.write(str(dataset.pk))

    def _import(self, path: Path, opts: dict, user, actor):
        from django.conf import settings

        from ...parsing import CsvMapping

        dataset = Dataset.objects.filter(name=opts["name"]).first()
        if dataset is None:
            base_name = opts["base_model"] or settings.STUDIO_DEFAULT_BASE_MODEL
            base = BaseModel.objects.filter(name=base_name, status=BaseModel.Status.ACTIVE).first()
            if opts["base_model"] and base is None:
                raise CommandError(f"base model {base_name!r} is not registered")
            policy = PiiPolicy(keep_patterns=[*DEFAULT_KEEP_PATTERNS, *opts["keep_pattern"]])
            dataset = datasets.create_dataset(
                opts["name"], opts["kind"], actor, base_model=base, policy=policy
            )
        else:
            if dataset.kind != opts["kind"]:
                raise CommandError(f"dataset {dataset.name!r} holds {dataset.kind} data, not {opts['kind']}")
            if opts["keep_pattern"]:
                policy = scrub.policy_for(dataset)
                policy.keep_patterns = list(dict.fromkeys([*policy.keep_patterns, *opts["keep_pattern"]]))
                datasets.update_policy(dataset, policy, actor)
        upload = imports.receive_path(dataset, user, path, fmt=opts["format"])
        if imports.needs_csv_mapping(upload):
            imports.set_csv_mapping(
                upload, CsvMapping(prompt=opts["csv_prompt"], response=opts["csv_response"])
            )
        return dataset, upload, imports.process(upload.pk)


class _NothingImported(Exception):
    def __init__(self, result):
        self.result = result
