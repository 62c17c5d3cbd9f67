"""Helpers shared by the apps' management commands."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.db.models import Q

from .roles import ADMIN, ENGINEER, has_role


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
