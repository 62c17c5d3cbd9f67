"""Forms of the studio shell: user management (used by the admin pages and `manage.py create_user`
alike, so validation and auditing live in one place) and the audit log / user list filters."""

from __future__ import annotations

from django import forms
from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.forms import SetPasswordForm
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q

from . import audit
from .models import AuditEvent
from .roles import ADMIN, ROLE_LABELS, ROLES, ensure_groups

User = get_user_model()

ROLE_CHOICES = [(role, ROLE_LABELS[role]) for role in ROLES]


def assigned_roles(user) -> list[str]:
    """The role groups a user is a direct member of, in ROLES order (not the roles admin implies).
    A Django superuser (setup_studio's first admin, `createsuperuser`) counts as a member of admin."""
    names = set(user.groups.filter(name__in=ROLES).values_list("name", flat=True)) if user.pk else set()
    if user.is_superuser:
        names.add(ADMIN)
    return [role for role in ROLES if role in names]


def _admin_changes_locked() -> None:
    """Serialise every change that could remove an admin: the admin group's row stays locked until
    the transaction ends, so two admins demoting each other at the same moment cannot both pass the
    last-admin check below."""
    Group.objects.select_for_update().filter(name=ADMIN).exists()


def _an_admin_remains() -> None:
    """Inside the transaction, after the change: refuse (and so roll back) when no active account
    would be left that can administer the studio."""
    admins = User.objects.filter(is_active=True).filter(
        Q(is_superuser=True) | Q(groups__name=ADMIN) | Q(groups__permissions__codename="administer")
    )
    if not admins.exists():
        raise ValidationError(
            "This would leave the studio without an active admin; make someone else admin first."
        )


def set_roles(user, roles) -> None:
    """Make the user's role groups exactly `roles`; groups that are not roles are left alone."""
    groups = ensure_groups()
    wanted = {groups[role] for role in roles}
    current = set(user.groups.filter(name__in=ROLES))
    if current - wanted:
        user.groups.remove(*(current - wanted))
    if wanted - current:
        user.groups.add(*(wanted - current))


class RolesField(forms.MultipleChoiceField):
    widget = forms.CheckboxSelectMultiple

    def __init__(self, **kwargs):
        kwargs.setdefault("choices", ROLE_CHOICES)
        kwargs.setdefault("help_text", "Admin implies every other role.")
        super().__init__(**kwargs)

    def clean(self, value):
        chosen = set(super().clean(value))
        return [role for role in ROLES if role in chosen]  # stable order for audit data


class UserCreateForm(forms.ModelForm):
    password1 = forms.CharField(
        label="Password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text=password_validation.password_validators_help_text_html(),
    )
    password2 = forms.CharField(
        label="Repeat password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )
    roles = RolesField(error_messages={"required": "Give the user at least one role."})

    class Meta:
        model = User
        fields = ["username", "email", "first_name", "last_name"]
        widgets = {"username": forms.TextInput(attrs={"autocomplete": "off", "autofocus": True})}

    def clean_username(self):
        # the model normalises (NFKC) on save: compare the name it will store, or "ＡＤＡ" passes
        username = User.normalize_username(self.cleaned_data["username"])
        if User.objects.filter(username__iexact=username).exists():
            raise ValidationError("A user with that username already exists.")
        return username

    def clean(self):
        cleaned = super().clean()
        password1, password2 = cleaned.get("password1"), cleaned.get("password2")
        if password1 and password2 and password1 != password2:
            self.add_error("password2", "The two passwords don't match.")
        elif password1:
            candidate = User(
                username=cleaned.get("username", ""),
                email=cleaned.get("email", ""),
                first_name=cleaned.get("first_name", ""),
                last_name=cleaned.get("last_name", ""),
            )
            try:
                password_validation.validate_password(password1, candidate)
            except ValidationError as error:
                self.add_error("password1", error)
        return cleaned

    def save(self, actor):
        """Create the user, their roles and the audit event in one transaction."""
        with transaction.atomic():
            user = super().save(commit=False)
            user.set_password(self.cleaned_data["password1"])
            user.save()
            roles = self.cleaned_data["roles"]
            set_roles(user, roles)
            audit.record(actor, "user.created", user, roles=roles, active=user.is_active)
        return user


class UserEditForm(forms.ModelForm):
    roles = RolesField(required=False)

    class Meta:
        model = User
        fields = ["email", "first_name", "last_name"]

    def __init__(self, *args, actor, **kwargs):
        super().__init__(*args, **kwargs)
        self.actor = actor
        self.roles_before = assigned_roles(self.instance)
        self.fields["roles"].initial = self.roles_before

    def clean_roles(self):
        roles = self.cleaned_data["roles"]
        if self.instance.pk == self.actor.pk and ADMIN in self.roles_before and ADMIN not in roles:
            raise ValidationError("You can't remove your own admin role. Ask another admin to do it.")
        return roles

    @property
    def has_changes(self) -> bool:
        return bool(self.changed_data)

    def save(self):
        roles_after = self.cleaned_data["roles"]
        fields = [name for name in self.changed_data if name != "roles"]
        with transaction.atomic():
            _admin_changes_locked()
            user = super().save(commit=False)
            if ADMIN not in roles_after and (user.is_superuser or user.is_staff):
                # is_superuser passes every role check: taking the admin role must take it too
                user.is_superuser = user.is_staff = False
            user.save()
            set_roles(user, roles_after)
            _an_admin_remains()
            data = {"fields": fields}  # names only: the values are personal data
            if roles_after != self.roles_before:
                data["roles"] = {"before": self.roles_before, "after": roles_after}
            audit.record(self.actor, "user.updated", user, **data)
        return user


class AdminSetPasswordForm(SetPasswordForm):
    """An admin sets a new password for someone (Django's validators apply)."""

    def __init__(self, user, *args, actor, **kwargs):
        super().__init__(user, *args, **kwargs)
        self.actor = actor
        for name in ("new_password1", "new_password2"):
            self.fields[name].widget.attrs["autocomplete"] = "new-password"
            self.fields[name].widget.attrs.pop("autofocus", None)

    def save(self):
        with transaction.atomic():
            user = super().save(commit=True)
            audit.record(self.actor, "user.password_reset", user, by_admin=True)
        return user


def set_active(actor, user, active: bool) -> bool:
    """Deactivate or reactivate an account. Returns False when it was already in that state."""
    if not active and user.pk == getattr(actor, "pk", None):
        raise ValidationError("You can't deactivate your own account. Ask another admin to do it.")
    with transaction.atomic():
        _admin_changes_locked()
        changed = User.objects.filter(pk=user.pk, is_active=not active).update(is_active=active)
        if not changed:
            return False
        _an_admin_remains()
        user.is_active = active
        audit.record(actor, "user.reactivated" if active else "user.deactivated", user, active=active)
    return True


# --- Filters -----------------------------------------------------------------------------------------


# Searches are bounded: an unbounded one becomes a LIKE pattern SQLite refuses ("pattern too complex"),
# which would show the "database unavailable" page for what is only a bad search.
SEARCH_MAX_LENGTH = 200


class UserFilterForm(forms.Form):
    q = forms.CharField(
        required=False,
        label="Search",
        max_length=SEARCH_MAX_LENGTH,
        widget=forms.TextInput(attrs={"type": "search"}),
    )
    role = forms.ChoiceField(required=False, choices=[("", "Any role"), *[(r, r.title()) for r in ROLES]])
    status = forms.ChoiceField(
        required=False,
        choices=[("", "Active and inactive"), ("active", "Active"), ("inactive", "Inactive")],
    )

    def filter(self, queryset):
        if not self.is_valid():
            return queryset if "q" not in self.errors else queryset.none()
        data = self.cleaned_data
        if data["q"]:
            q = data["q"]
            queryset = queryset.filter(
                Q(username__icontains=q)
                | Q(email__icontains=q)
                | Q(first_name__icontains=q)
                | Q(last_name__icontains=q)
            )
        if data["role"]:
            queryset = queryset.filter(groups__name=data["role"])
        if data["status"]:
            queryset = queryset.filter(is_active=data["status"] == "active")
        return queryset.distinct()


class AuditFilterForm(forms.Form):
    actor = forms.CharField(
        required=False, max_length=SEARCH_MAX_LENGTH, widget=forms.TextInput(attrs={"type": "search"})
    )
    verb = forms.ChoiceField(required=False)
    object_type = forms.ChoiceField(required=False, label="Object type")
    object_id = forms.CharField(
        required=False,
        label="Object id",
        max_length=AuditEvent._meta.get_field("object_id").max_length,
        widget=forms.TextInput(attrs={"type": "search"}),
    )
    since = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        verbs = AuditEvent.objects.order_by("verb").values_list("verb", flat=True).distinct()
        types = (
            AuditEvent.objects.exclude(object_type="")
            .order_by("object_type")
            .values_list("object_type", flat=True)
            .distinct()
        )
        self.fields["verb"].choices = [("", "Any action"), *[(v, v) for v in verbs]]
        self.fields["object_type"].choices = [("", "Any type"), *[(t, t) for t in types]]

    def clean(self):
        cleaned = super().clean()
        since, until = cleaned.get("since"), cleaned.get("until")
        if since and until and since > until:
            self.add_error("until", "The end date is before the start date.")
        return cleaned

    def filter(self, queryset):
        if not self.is_valid():
            return queryset.none()
        data = self.cleaned_data
        if data["actor"]:
            queryset = queryset.filter(actor_name__icontains=data["actor"].strip())
        if data["verb"]:
            queryset = queryset.filter(verb=data["verb"])
        if data["object_type"]:
            queryset = queryset.filter(object_type=data["object_type"])
        if data["object_id"]:
            queryset = queryset.filter(object_id=data["object_id"].strip())
        if data["since"]:
            queryset = queryset.filter(created_at__date__gte=data["since"])
        if data["until"]:
            queryset = queryset.filter(created_at__date__lte=data["until"])
        return queryset

    @property
    def is_filtered(self) -> bool:
        return self.is_bound and self.is_valid() and any(self.cleaned_data.values())
