"""Views of the studio shell: sign-in, dashboard, user administration and the audit log."""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from django.apps import apps
from django.contrib import messages
from django.contrib.auth import get_user_model, update_session_auth_hash
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import LoginView
from django.core.exceptions import FieldError, ValidationError
from django.core.paginator import Paginator
from django.db import DatabaseError, transaction
from django.db.models import Max, Prefetch
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from . import ratelimit
from .audit import ChainReport, compute_hash, verify_from_checkpoint
from .context_processors import first_url
from .forms import (
    AdminSetPasswordForm,
    AuditFilterForm,
    UserCreateForm,
    UserEditForm,
    UserFilterForm,
    assigned_roles,
    set_active,
)
from .htmx import is_htmx_partial, render_htmx
from .models import AuditEvent
from .roles import ADMIN, CURATOR, ENGINEER, REVIEWER, ROLES, has_role, role_required, user_roles

logger = logging.getLogger(__name__)
User = get_user_model()

USERS_PER_PAGE = 25
EVENTS_PER_PAGE = 50


# --- Sign-in ------------------------------------------------------------------------------------------


class StudioLoginView(LoginView):
    """Django's LoginView behind a per-IP and per-username failure limit (studio.ratelimit)."""

    template_name = "registration/login.html"
    redirect_authenticated_user = True

    def get_redirect_url(self):
        """`next`, unless it is the sign-in page itself: Django answers a signed-in user sent there
        with a "Redirection loop" 500, and after signing in it would only show the form again."""
        url = super().get_redirect_url()
        if url and urlsplit(url).path == reverse("login"):
            return ""
        return url

    def post(self, request, *args, **kwargs):
        username = request.POST.get("username", "")
        # Counted before the password is checked, so parallel attempts cannot all slip under the limit.
        lockout = ratelimit.check(request, username) or ratelimit.reserve(request, username)
        if lockout is not None:
            # Locked: answer without looking at the password at all.
            return self._locked(username, lockout)
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        username = self.request.POST.get("username", "")
        lockout = ratelimit.check(self.request, username)  # the attempt was counted by post()
        if lockout is not None:
            logger.warning("sign-in locked after repeated failures (retry in %ss)", lockout.retry_after)
            return self._locked(username, lockout)
        return super().form_invalid(form)

    def form_valid(self, form):
        ratelimit.succeeded(self.request, self.request.POST.get("username", ""))
        return super().form_valid(form)

    def _locked(self, username: str, lockout: ratelimit.Lockout):
        # An unbound form: a bound one would authenticate while rendering its errors.
        form = self.get_form_class()(self.request, initial={"username": username})
        context = self.get_context_data(form=form, lockout_message=lockout.message)
        response = self.render_to_response(context, status=429)
        response["Retry-After"] = str(lockout.retry_after)
        return response


# --- Dashboard ----------------------------------------------------------------------------------------


def _count(model_label: str, **filters) -> int | None:
    """Count rows of another app's model; None while that app (or its table or field) isn't there."""
    try:
        model = apps.get_model(model_label)
    except (LookupError, ValueError):
        return None
    try:
        with transaction.atomic():  # a savepoint, so a missing table can't poison an outer transaction
            return model._default_manager.filter(**filters).count()
    except (FieldError, DatabaseError):
        return None


def _dashboard_cards(user) -> list[dict]:
    cards = []
    if has_role(user, CURATOR) or has_role(user, ENGINEER):
        cards.append(
            {
                "title": "Datasets",
                "icon": "database",
                "text": "Upload conversations, scrub PII, review and freeze immutable versions.",
                "url": first_url("datasets:list"),
                "metrics": [
                    ("datasets", _count("datasets_app.Dataset")),
                    ("versions", _count("datasets_app.DatasetVersion")),
                    ("PII to review", _count("datasets_app.PiiFinding", decision="pending")),
                ],
            }
        )
    if has_role(user, ENGINEER):
        cards.append(
            {
                "title": "Training",
                "icon": "cpu",
                "text": "Fine-tune a base model on a frozen dataset version and follow its loss curve.",
                "url": first_url("training:jobs", "training:base_models"),
                "metrics": [
                    ("running jobs", _count("training_app.TrainingJob", state="running")),
                    ("base models", _count("training_app.BaseModel")),
                ],
            }
        )
    if has_role(user, REVIEWER):
        cards.append(
            {
                "title": "Reviews",
                "icon": "scale",
                "text": "Compare two models' answers blind and vote for the better one.",
                "url": first_url("eval:reviews"),
                "metrics": [("your votes", _count("eval_app.Vote", reviewer=user))],
            }
        )
    if has_role(user, ADMIN):
        cards.append(
            {
                "title": "Users",
                "icon": "users",
                "text": "Invite people, give them roles, deactivate accounts.",
                "url": first_url("users"),
                "metrics": [("active users", User.objects.filter(is_active=True).count())],
            }
        )
        cards.append(
            {
                "title": "Audit log",
                "icon": "shield",
                "text": "Every state change, hash-chained so edits and deletions are detected.",
                "url": first_url("audit"),
                "metrics": [("events", AuditEvent.objects.count())],
            }
        )
    for card in cards:
        card["metrics"] = [(label, value) for label, value in card["metrics"] if value is not None]
    return cards


@login_required
def home(request):
    user = request.user
    events = AuditEvent.objects.select_related("actor")
    if not has_role(user, ADMIN):
        events = events.filter(actor=user)
    context = {
        "cards": _dashboard_cards(user),
        "roles": user_roles(user),
        "recent_events": events[:8],
        "recent_scope": "everyone" if has_role(user, ADMIN) else "you",
    }
    return render(request, "studio/home.html", context)


# --- Users --------------------------------------------------------------------------------------------


@role_required(ADMIN)
def users(request):
    form = UserFilterForm(request.GET or None)
    queryset = User.objects.order_by("username").prefetch_related(
        Prefetch("groups", to_attr="prefetched_groups")
    )
    if form.is_bound:
        queryset = form.filter(queryset)
    page = Paginator(queryset, USERS_PER_PAGE).get_page(request.GET.get("page"))
    for user in page:
        names = {group.name for group in user.prefetched_groups} | ({ADMIN} if user.is_superuser else set())
        user.role_list = [role for role in ROLES if role in names]
    context = {
        "form": form,
        "page": page,
        "total": User.objects.count(),
        "filtered": form.is_bound and form.is_valid() and any(form.cleaned_data.values()),
    }
    return render_htmx(request, "studio/users.html", "studio/partials/user_table.html", context)


@role_required(ADMIN)
def user_create(request):
    form = UserCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save(actor=request.user)
        messages.success(request, f"Created {user.get_username()}.")
        return redirect("user_edit", pk=user.pk)
    return render(request, "studio/user_create.html", {"form": form})


def _user_edit_page(request, target, *, form=None, password_form=None):
    events = AuditEvent.objects.filter(object_type=target._meta.model_name, object_id=str(target.pk))
    context = {
        "target": target,
        "object_type": target._meta.model_name,
        "target_roles": assigned_roles(target),
        "form": form or UserEditForm(instance=target, actor=request.user),
        "password_form": password_form or AdminSetPasswordForm(target, actor=request.user),
        "is_self": target.pk == request.user.pk,
        "events": events[:10],
        "events_total": events.count(),
    }
    return render(request, "studio/user_edit.html", context)


@role_required(ADMIN)
def user_edit(request, pk: int):
    target = get_object_or_404(User, pk=pk)
    if request.method == "POST":
        form = UserEditForm(request.POST, instance=target, actor=request.user)
        if form.is_valid():
            if form.has_changes:
                try:
                    form.save()
                except ValidationError as error:
                    form.add_error(None, error)
                    return _user_edit_page(request, target, form=form)
                messages.success(request, f"Saved {target.get_username()}.")
            else:
                messages.info(request, "Nothing changed.")
            return redirect("user_edit", pk=target.pk)
        return _user_edit_page(request, target, form=form)
    return _user_edit_page(request, target)


@require_POST
@role_required(ADMIN)
def user_set_active(request, pk: int):
    target = get_object_or_404(User, pk=pk)
    active = request.POST.get("active") == "1"
    try:
        changed = set_active(request.user, target, active)
    except ValidationError as error:
        messages.error(request, " ".join(error.messages))
    else:
        name = target.get_username()
        if not changed:
            messages.info(request, f"{name} was already {'active' if active else 'deactivated'}.")
        elif active:
            messages.success(request, f"Reactivated {name}. They can sign in again.")
        else:
            messages.success(request, f"Deactivated {name}. They are signed out and can't sign in.")
    return redirect("user_edit", pk=target.pk)


@require_POST
@role_required(ADMIN)
def user_password(request, pk: int):
    target = get_object_or_404(User, pk=pk)
    form = AdminSetPasswordForm(target, request.POST, actor=request.user)
    if not form.is_valid():
        return _user_edit_page(request, target, password_form=form)
    user = form.save()
    if user.pk == request.user.pk:
        update_session_auth_hash(request, user)
    messages.success(request, f"Set a new password for {user.get_username()}. Their other sessions ended.")
    return redirect("user_edit", pk=target.pk)


# --- Audit log ----------------------------------------------------------------------------------------


# Even as application/json, keep markup characters out of the body (as django.utils.html.json_script).
_JSON_ESCAPES = {ord("<"): "\\u003C", ord(">"): "\\u003E", ord("&"): "\\u0026"}


def _pretty_json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def chain_status(full: bool = False) -> tuple[ChainReport, object]:
    """(the chain's report, when the whole chain was last walked). A page load checks only the events
    after the checkpoint kept in the database (studio.audit.verify_from_checkpoint); `full` walks the
    whole chain now ("Check the whole chain")."""
    return verify_from_checkpoint(full)


def _chain_context(full: bool = False) -> dict:
    chain, full_at = chain_status(full)
    return {
        "chain": chain,
        "chain_full_at": full_at,
        "stats": AuditEvent.objects.aggregate(last=Max("created_at")),
    }


@role_required(ADMIN)
@require_http_methods(["GET", "HEAD", "POST"])
def audit(request):
    if request.method == "POST":  # "Check the whole chain"
        context = _chain_context(full=True)
        if is_htmx_partial(request):
            return render(request, "studio/partials/audit_chain.html", context)
        return _audit_page(request, context)
    return _audit_page(request, None)


def _audit_page(request, chain_context: dict | None):
    form = AuditFilterForm(request.GET or None)
    queryset = AuditEvent.objects.select_related("actor").order_by("-id")
    if form.is_bound:
        queryset = form.filter(queryset)
    page = Paginator(queryset, EVENTS_PER_PAGE).get_page(request.GET.get("page"))
    for event in page:
        event.data_pretty = _pretty_json(event.data)
    context = {
        "form": form,
        "page": page,
        "filtered": form.is_filtered,
    }
    if not is_htmx_partial(request):
        # Full page loads only, not every filter change; only events newer than the last check are read.
        context.update(chain_context or _chain_context())
    return render_htmx(request, "studio/audit.html", "studio/partials/audit_table.html", context)


@role_required(ADMIN)
def audit_event(request, pk: int):
    event = get_object_or_404(AuditEvent.objects.select_related("actor"), pk=pk)
    previous = AuditEvent.objects.filter(id__lt=event.pk).order_by("-id").only("id", "hash").first()
    context = {
        "event": event,
        "data_pretty": _pretty_json(event.data),
        "hash_ok": compute_hash(event) == event.hash,
        "link_ok": event.prev_hash == (previous.hash if previous else "0" * 64),
        "previous": previous,
        "next_event": AuditEvent.objects.filter(id__gt=event.pk).order_by("id").only("id").first(),
    }
    return render(request, "studio/audit_event.html", context)


@role_required(ADMIN)
def audit_event_json(request, pk: int):
    event = get_object_or_404(AuditEvent, pk=pk)
    payload = {
        "id": event.pk,
        "created_at": event.created_at.isoformat(),
        "actor_id": event.actor_id,
        "actor_name": event.actor_name,
        "verb": event.verb,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "object_repr": event.object_repr,
        "data": event.data,
        "prev_hash": event.prev_hash,
        "hash": event.hash,
    }
    body = json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False).translate(_JSON_ESCAPES)
    response = HttpResponse(body, content_type="application/json")
    response["Content-Disposition"] = f'inline; filename="audit-event-{event.pk}.json"'
    return response
