"""Helpers shared by the apps' management commands."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db.models import Q

from .roles import ADMIN, ENGINEER, has_role


def _not_text(value) -> bool:
    """True for a str argv value that is not valid text (undecodable bytes become lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


class StudioCommand(BaseCommand):
    """The studio's commands: arguments that are not valid UTF-8 text are refused up front, naming the
    argument, instead of failing with a traceback wherever they are first stored or compared."""

    path_options: tuple[str, ...] = ()  # file paths: any bytes the file system allows are fine

    def execute(self, *args, **options):
        checked = [(k, v) for k, v in options.items() if k not in self.path_options]
        for name, value in [("argument", a) for a in args] + checked:
            values = value if isinstance(value, list | tuple) else [value]
            if any(_not_text(v) for v in values):
                raise CommandError(f"{self._label(name)}: not valid UTF-8 text; pass it in UTF-8.")
        return super().execute(*args, **options)

    def _label(self, dest: str) -> str:
        """How the person wrote the argument: "--name" for an option, "USERNAME" for a positional."""
        for action in self.create_parser("manage.py", "")._actions:
            if action.dest == dest:
                return action.option_strings[-1] if action.option_strings else dest.upper()
        return dest


def acting_engineer(username: str, doing: str):
    """The active engineer named by `--by`, or the first admin when none is named; `doing` completes
    "only engineers …" in the refusal (e.g. "launch training jobs")."""
    users = get_user_model().objects.filter(is_active=True)
    if username:
        user = users.filter(username=username).first()
        if user is None:
            raise CommandError(f"User “{username}” does not exist or is disabled.")
        if not has_role(user, ENGINEER):
            raise CommandError(f"User “{username}” is not an engineer; only engineers {doing}.")
        return user
    user = users.filter(Q(is_superuser=True) | Q(groups__name=ADMIN)).order_by("pk").first()
    if user is None:
        raise CommandError("No admin exists yet: pass --by USERNAME (an engineer).")
    return user
