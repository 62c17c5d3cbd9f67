"""Create a studio user with roles, e.g. `manage.py create_user alice --role curator --role reviewer`."""

import secrets

from django.core.management.base import CommandError

from studio.cli import StudioCommand
from studio.forms import UserCreateForm
from studio.roles import ROLES


class Command(StudioCommand):
    help = "Create a user with one or more roles. Without --password a strong one is generated and printed."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--role",
            dest="roles",
            action="append",
            choices=ROLES,
            required=True,
            help="a role to give (repeat for several)",
        )
        parser.add_argument("--password", help="the password (checked by the password validators)")
        parser.add_argument("--email", default="")
        parser.add_argument("--first-name", default="")
        parser.add_argument("--last-name", default="")

    def handle(self, *args, **options):
        generated = options["password"] is None
        password = secrets.token_urlsafe(15) if generated else options["password"]
        form = UserCreateForm(
            data={
                "username": options["username"],
                "email": options["email"],
                "first_name": options["first_name"],
                "last_name": options["last_name"],
                "password1": password,
                "password2": password,
                "roles": options["roles"],
            }
        )
        if not form.is_valid():
            problems = [
                f"{name if name != '__all__' else 'error'}: {message}"
                for name, messages in form.errors.items()
                for message in messages
            ]
            raise CommandError("Could not create the user.\n  " + "\n  ".join(problems))
        user = form.save(actor="manage.py create_user")
        roles = ", ".join(form.cleaned_data["roles"])
        self.stdout.write(f"Created user {user.get_username()} (roles: {roles}).")
        if generated:
            self.stdout.write(f"Password: {password}")
            self.stdout.write("It is shown once: pass it on over a safe channel.")
