"""`manage.py create_api_key USERNAME [--name NAME]`: print a new API key (shown this once only)."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from studio.cli import StudioCommand

from ...services import serving


class Command(StudioCommand):
    help = (
        "Create an API key for USERNAME (an active engineer or admin) and print it. Only its hash is "
        "stored: the key cannot be shown again. The last line of the output is the key."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--name", default="", help="a label to tell the key apart, e.g. 'ci' or 'chatbot'"
        )

    def handle(self, *args, **opts):
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: opts["username"]})
        except User.DoesNotExist:
            raise CommandError(f"No user named {opts['username']!r}.")
        try:
            _, raw = serving.create_key(user, opts["name"], actor="cli")
        except serving.KeyRefused as exc:
            raise CommandError(str(exc))
        self.stdout.write(raw)
