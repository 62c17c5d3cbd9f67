"""Walk the audit chain; exit 1 at the first edited, inserted or deleted event."""

import sys

from django.core.management.base import BaseCommand

from studio.audit import verify_chain


class Command(BaseCommand):
    help = "Check that the audit log's hash chain is intact (exit status 1 if it is not)."

    def handle(self, *args, **options):
        report = verify_chain()
        if report.ok:
            self.stdout.write(f"Audit chain intact: {report.checked} events checked.")
            return
        self.stderr.write(f"Audit chain broken at event #{report.broken_at}: {report.problem}")
        sys.exit(1)
