from __future__ import annotations

import hashlib
import os
from pathlib import Path

from django.core.management.base import CommandError

from studio.cli import StudioCommand

from ...models import DatasetVersion
from ...services.versions import export_lines


class Command(StudioCommand):
    help = "Write a frozen dataset version as OpenAI chat JSONL, in import order."

    def add_arguments(self, parser):
        parser.add_argument("version_id", type=int)
        parser.add_argument("--out", required=True)

    def handle(self, *args, **opts):
        version = DatasetVersion.objects.filter(pk=opts["version_id"]).first()
        if version is None:
            raise CommandError(f"dataset version {opts['version_id']} does not exist")
        out = Path(opts["out"])
        if not out.parent.is_dir():
            raise CommandError(f"--out: the folder {out.parent} does not exist; create it or choose another.")
        if out.is_dir():
            raise CommandError(f"--out: {out} is a folder; give a file name, e.g. {out / 'dataset.jsonl'}.")
        tmp = out.with_name(out.name + ".part")
        n = 0
        digest = hashlib.sha256()  # of the bytes written: what `sha256sum` of the file prints
        try:
            with open(tmp, "wb") as fh:
                for line in export_lines(version):
                    fh.write(line)
                    digest.update(line)
                    n += 1
            os.replace(tmp, out)
        except OSError as exc:  # read-only or full file system, a name too long, a folder in the way
            if tmp.is_file():
                tmp.unlink()
            raise CommandError(f"--out: {out} could not be written ({exc.strerror or exc}).") from None
        self.stderr.write(
            f"wrote {n} examples of {version}: file sha256 {digest.hexdigest()} "
            f"(the version page shows it as the export file SHA-256; content sha256 {version.sha256})"
        )
        self.stdout.write(str(out))
