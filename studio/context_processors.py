"""Sidebar navigation built from the signed-in user's roles.

Each entry is reversed with NoReverseMatch guarded, so an app whose URLs are not wired yet simply
does not appear instead of breaking every page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from django.db import DatabaseError
from django.urls import NoReverseMatch, reverse

from .roles import ADMIN, CURATOR, ENGINEER, REVIEWER, user_roles

STUDIO_NAME = "Fine-Tuning Studio"


@dataclass(frozen=True)
class NavItem:
    label: str
    url_names: tuple[str, ...]  # the first one that reverses is used
    icon: str  # a key of the inline icon set in templates/studio/partials/icon.html
    roles: tuple[str, ...]
    exact: bool = False  # active only on the exact URL (the dashboard), not on every page below it


@dataclass
class NavLink:
    label: str
    url: str
    icon: str
    active: bool


@dataclass
class NavSection:
    title: str
    links: list[NavLink] = field(default_factory=list)


# (section title, items). Admins pass every role check, so they see every section.
NAVIGATION: tuple[tuple[str, tuple[NavItem, ...]], ...] = (
    ("", (NavItem("Dashboard", ("home",), "home", (CURATOR, REVIEWER, ENGINEER, ADMIN), exact=True),)),
    (
        "Workflow",
        (
            NavItem("Datasets", ("datasets:list",), "database", (CURATOR, ENGINEER)),
            NavItem("Training", ("training:jobs", "training:base_models"), "cpu", (ENGINEER,)),
            NavItem("Models", ("eval:models",), "box", (ENGINEER,)),
            NavItem("Evaluations", ("eval:runs",), "check", (ENGINEER,)),
            NavItem("Playground", ("eval:playground",), "code", (ENGINEER,)),
            NavItem("API keys", ("eval:api_keys",), "key", (ENGINEER,)),
            NavItem("Canaries", ("eval:canaries",), "alert", (CURATOR,)),
            NavItem("Reviews", ("eval:reviews",), "scale", (REVIEWER,)),
            NavItem("Promotions", ("eval:promotions",), "rocket", (ADMIN,)),
        ),
    ),
    (
        "Admin",
        (
            NavItem("Users", ("users",), "users", (ADMIN,)),
            NavItem("Audit log", ("audit",), "shield", (ADMIN,)),
        ),
    ),
)


def first_url(*names: str) -> str | None:
    """The URL of the first name that reverses (no arguments), or None if none does."""
    for name in names:
        try:
            return reverse(name)
        except NoReverseMatch:
            continue
    return None


def build_navigation(path: str, roles: list[str]) -> list[NavSection]:
    sections = []
    for title, items in NAVIGATION:
        section = NavSection(title)
        for item in items:
            if not set(item.roles) & set(roles):
                continue
            url = first_url(*item.url_names)
            if url is None:
                continue
            active = path == url if item.exact else path.startswith(url)
            section.links.append(NavLink(item.label, url, item.icon, active))
        if section.links:
            sections.append(section)
    # Only the most specific match is active: /models/reviews/ is "Reviews", not also "Models".
    matches = [link for section in sections for link in section.links if link.active]
    best = max(matches, key=lambda link: len(link.url), default=None)
    for link in matches:
        link.active = link is best
    return sections


def navigation(request) -> dict:
    context = {"studio_name": STUDIO_NAME, "nav_sections": [], "current_roles": [], "role_badges": []}
    user = getattr(request, "user", None)
    try:
        if user is None or not user.is_authenticated:
            return context
        roles = user_roles(user)
    except DatabaseError:
        # The 403/404 pages still render (without navigation) when the database is unreachable.
        return context
    context["current_roles"] = roles  # effective roles: an admin has all four
    context["role_badges"] = [ADMIN] if ADMIN in roles else roles  # what the top bar shows
    context["nav_sections"] = build_navigation(request.path, roles)
    return context
