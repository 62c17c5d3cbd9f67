"""Idempotent first-run setup used by `make run`: roles, a first admin, the bundled base model and
a small demo dataset."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from django.contrib.auth import get_user_model, password_validation
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError
from django.db import transaction

from studio import audit
from studio.cli import StudioCommand
from studio.roles import ADMIN, ensure_groups

DEMO_NAME = "Demo support conversations"
DEMO_FILE = Path(__file__).resolve().parents[3] / "datasets_app" / "demo" / "support_demo.jsonl"


class Command(StudioCommand):
    help = "Create role groups, a first admin, register SmolLM2 and load the demo dataset (idempotent)."

    def add_arguments(self, parser):
        parser.add_argument("--skip-model", action="store_true")
        parser.add_argument("--skip-demo", action="store_true")

    def handle(self, *args, **opts):
        groups = ensure_groups()
        admin = self._first_admin(groups[ADMIN])
        if not opts["skip_model"]:
            from training_app.services import register_bundled_smollm2

            model = register_bundled_smollm2(admin)
            self.stdout.write(f"Base model {model.name} ready at {model.local_dir}")
        if not opts["skip_demo"]:
            self._demo(admin)

    def _first_admin(self, group):
        User = get_user_model()
        # An active admin owns what setup creates (the demo data, the base model): never a deactivated one.
        active = User.objects.filter(is_active=True).order_by("pk")
        existing = active.filter(groups=group).first() or active.filter(is_superuser=True).first()
        if existing:
            return existing
        taken = User.objects.filter(username="admin").first()
        if taken is not None:
            if not taken.is_active and (taken.is_superuser or taken.groups.filter(pk=group.pk).exists()):
                problem = "The admin 'admin' is deactivated and no other admin is active"
            else:
                problem = "A user called 'admin' exists but is not an admin, and no active admin exists"
            raise CommandError(
                f"{problem}: reactivate an admin or give a user the admin role "
                "(python manage.py create_user NAME --role admin) and run this again."
            )
        password = os.environ.get("STUDIO_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        try:
            password_validation.validate_password(password, User(username="admin"))
        except ValidationError as error:
            raise CommandError("STUDIO_ADMIN_PASSWORD: " + " ".join(error.messages)) from None
        with transaction.atomic():
            user = User.objects.create_user("admin", password=password, is_staff=True, is_superuser=True)
            user.groups.add(group)
            audit.record("setup", "user.created", user, roles=[ADMIN])
        if os.environ.get("STUDIO_ADMIN_PASSWORD"):
            self.stdout.write("Created the first admin 'admin' with the password from STUDIO_ADMIN_PASSWORD.")
        else:
            self.stdout.write(
                self.style.WARNING(
                    f"Created the first admin 'admin' with password: {password}\n"
                    "  (shown once: write it down, then change it after signing in)"
                )
            )
        return user

    def _demo(self, admin) -> None:
        from datasets_app.models import Dataset
        from datasets_app.pii import DEFAULT_KEEP_PATTERNS, PiiPolicy
        from datasets_app.services import datasets, duplicates, imports, scrub, versions
        from training_app.models import BaseModel

        if Dataset.objects.filter(name=DEMO_NAME).exists():
            return
        base = BaseModel.objects.filter(status=BaseModel.Status.ACTIVE).first()
        dataset = datasets.create_dataset(
            DEMO_NAME,
            "sft",
            admin,
            description="Synthetic support chats with planted personal data, to try the curation flow.",
            base_model=base,
            policy=PiiPolicy(keep_patterns=list(DEFAULT_KEEP_PATTERNS)),
        )
        upload = imports.receive_path(dataset, admin, DEMO_FILE)
        result = imports.process(upload.pk)
        # held-out splits, so that a version frozen from the demo can be evaluated (eval and golden)
        splits = versions.split_by_ratio(dataset, 0.8, 0.1, 0.1, seed=0, user=admin)
        duplicates.recompute(dataset)
        scrub.scan_examples(dataset)
        self.stdout.write(
            f"Demo dataset loaded: {result.imported} examples ({splits['train']} train, {splits['eval']} eval, "
            f"{splits['golden']} golden), {result.rejected} rejected lines to look at, "
            f"{dataset.findings.count()} personal-data findings to review."
        )
