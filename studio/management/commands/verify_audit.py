"""Walk the audit chain; exit 1 at the first edited, inserted or deleted event."""

import re
import sys

from django.core.management.base import CommandError

from studio.audit import verify_chain
from studio.cli import StudioCommand


class Command(StudioCommand):
    help = (
        "Check that the audit log's hash chain is intact (exit status 1 if it is not). Prints the head "
        "hash: keep it outside the studio and pass it back with --expect to also detect deleted newest events."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--expect",
            default="",
            metavar="HASH",
            help="a head hash printed by an earlier run: it must still be in the chain",
        )

    def handle(self, *args, **options):
        expect = options["expect"].strip().lower()
        if expect and not re.fullmatch(r"[0-9a-f]{64}", expect):
            raise CommandError(
                "--expect: a head hash is 64 hexadecimal characters, as verify_audit prints it."
            )
        report = verify_chain(expect)
        if report.ok:
            self.stdout.write(f"Audit chain intact: {report.checked} events checked.")
            if report.head_id:
                self.stdout.write(f"Head: event #{report.head_id} {report.head_hash}")
            return
        if report.broken_at is not None:
            self.stderr.write(f"Audit chain broken at event #{report.broken_at}: {report.problem}")
        else:
            self.stderr.write(f"Audit chain truncated: {report.problem}")
        sys.exit(1)
