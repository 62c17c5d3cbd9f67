"""python manage.py promote VERSION_ID --alias production --by USERNAME [--comment TEXT] [--run RUN_ID]
[--strict]

Creates a promotion request (the same service as the "Request promotion" form) and prints its id and the
policy check, one rule a line. An admin who neither requested nor trained the version approves it in
the UI. Exit status 1 with the reason when the request is refused; with --strict also when a rule fails.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.db import transaction

from studio.cli import StudioCommand

from ...models import EvalRun, ModelVersion
from ...services import gate


class Command(StudioCommand):
    help = "Request the promotion of a model version to an alias and print the policy check."

    def add_arguments(self, parser):
        parser.add_argument("version_id", type=int, help="model version id (see the version's page)")
        parser.add_argument("--alias", default=gate.PRODUCTION, help="alias to move (default: production)")
        parser.add_argument("--by", required=True, help="username of the engineer or admin asking")
        parser.add_argument("--comment", default="", help="note for the approver")
        parser.add_argument("--run", type=int, help="evaluation run to judge by (default: the latest)")
        parser.add_argument("--strict", action="store_true", help="exit 1 when a policy rule fails")

    def handle(self, *args, **opts):
        user = get_user_model().objects.filter(username=opts["by"]).first()
        if user is None:
            raise CommandError(f"User “{opts['by']}” does not exist.")
        version = (
            ModelVersion.objects.select_related("registered_model").filter(pk=opts["version_id"]).first()
        )
        if version is None:
            raise CommandError(f"Model version {opts['version_id']} does not exist.")
        run = None
        if opts["run"] is not None:
            run = EvalRun.objects.filter(pk=opts["run"]).first()
            if run is None:
                raise CommandError(f"Evaluation run {opts['run']} does not exist.")
        strict_refusal = None
        try:
            with transaction.atomic():  # --strict: a failing policy files nothing
                req = gate.request_promotion(
                    user, version, opts["alias"], eval_run=run, comment=opts["comment"]
                )
                if opts["strict"] and not req.policy["passed"]:
                    strict_refusal = req
                    raise _PolicyFails
        except gate.GateRefused as exc:
            raise CommandError(str(exc)) from None
        except _PolicyFails:
            req = strict_refusal
        policy = req.policy
        if strict_refusal is None:
            self.stdout.write(f"promotion request {req.pk}: {version} → {req.alias} (pending)")
        for rule in policy["rules"]:
            mark = "PASS" if rule["passed"] else "FAIL"
            detail = f" — {rule['detail']}" if rule["detail"] else ""
            self.stdout.write(f"  [{mark}] {rule['label']}: {rule['figure']}{detail}")
        if policy["passed"]:
            self.stdout.write(
                self.style.SUCCESS("policy: passes; an admin who did not request or train it approves")
            )
        else:
            message = (
                f"policy: fails ({', '.join(policy['failed'])}); approval needs an admin's override with a "
                f"written justification"
            )
            if strict_refusal is not None:
                raise CommandError(message + "; with --strict no request was filed")
            self.stdout.write(self.style.WARNING(message))
        self.stdout.write(str(req.pk))


class _PolicyFails(Exception):
    """--strict and a failing rule: roll the request back."""
