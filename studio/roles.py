"""Roles are Django groups holding the studio permissions; admin implies every role."""

from __future__ import annotations

from functools import wraps

from django.contrib.auth.models import Group, Permission
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied

CURATOR, REVIEWER, ENGINEER, ADMIN = "curator", "reviewer", "engineer", "admin"
ROLES = (CURATOR, REVIEWER, ENGINEER, ADMIN)
ROLE_PERMISSION = {CURATOR: "curate", REVIEWER: "review", ENGINEER: "train", ADMIN: "administer"}
ROLE_LABELS = {
    CURATOR: "Curator — uploads, scrubs and freezes datasets",
    REVIEWER: "Reviewer — votes blind between two models' answers",
    ENGINEER: "Engineer — fine-tunes models on frozen datasets",
    ADMIN: "Admin — users, roles, approvals; implies every role",
}


def ensure_groups() -> dict[str, Group]:
    """Create the four role groups with their permissions (idempotent)."""
    perms = {p.codename: p for p in Permission.objects.filter(content_type__app_label="studio")}
    missing = set(ROLE_PERMISSION.values()) - set(perms)
    if missing:
        raise RuntimeError(f"permissions {sorted(missing)} missing: run `manage.py migrate` first")
    groups = {}
    for role in ROLES:
        group, _ = Group.objects.get_or_create(name=role)
        wanted = list(perms.values()) if role == ADMIN else [perms[ROLE_PERMISSION[role]]]
        group.permissions.set(wanted)
        groups[role] = group
    return groups


def has_role(user, role: str) -> bool:
    if not user.is_authenticated or not user.is_active:
        return False
    if user.is_superuser:
        return True
    return user.has_perm(f"studio.{ROLE_PERMISSION[role]}") or user.has_perm("studio.administer")


def user_roles(user) -> list[str]:
    return [role for role in ROLES if has_role(user, role)]


def role_required(*roles: str):
    """View decorator: login required, then any of `roles` (admin always passes) or 403."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {unknown}")

    def decorator(view):
        @wraps(view)
        def wrapped(request, *args, **kwargs):
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not any(has_role(request.user, role) for role in roles):
                raise PermissionDenied(f"This page needs the {' or '.join(roles)} role.")
            return view(request, *args, **kwargs)

        wrapped.required_roles = roles
        return wrapped

    return decorator
