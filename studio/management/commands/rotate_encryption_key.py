"""Re-encrypt every encrypted file under the data dir, and the sealed reasons of uploads in the
database, with the first key of STUDIO_ENCRYPTION_KEY.

Rotation: put the new key first and keep the old one after it (`STUDIO_ENCRYPTION_KEY=new,old`), restart
web and workers, run this command, then drop the old key.  Files already under the new key are skipped, so
the command can be re-run after an interruption; each file is replaced atomically.
"""

import sys
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.core.management.base import CommandError

from datasets_app.models import Upload
from datasets_app.services.storage import (
    DecryptionError,
    decrypt_chunks,
    is_encrypted,
    reencrypt_file,
    reseal,
    tokens,
)
from studio.cli import StudioCommand

NO_KEY = "no configured key decrypts it; add the key it was written with to STUDIO_ENCRYPTION_KEY."


def encrypted_files(root: Path):
    for path in sorted(root.rglob("*")):
        if (
            path.is_file()
            and not path.is_symlink()
            and not path.name.endswith(".part")
            and is_encrypted(path)
        ):
            yield path


def under_primary_key(path: Path, primary: Fernet) -> bool:
    try:
        for token in tokens(path):
            primary.decrypt(token)
    except (InvalidToken, DecryptionError):  # cut off, or another key: the rotation reports it
        return False
    return True


class Command(StudioCommand):
    help = (
        "Re-encrypt the data dir's encrypted files and the uploads' sealed reasons with the first "
        "configured STUDIO_ENCRYPTION_KEY."
    )

    def add_arguments(self, parser):
        parser.add_argument("--check", action="store_true", help="only report files still under an old key")

    def handle(self, *args, check=False, **options):
        keys = [k.strip() for k in settings.STUDIO_ENCRYPTION_KEY.split(",") if k.strip()]
        if not keys:
            raise CommandError("STUDIO_ENCRYPTION_KEY is empty: set it to the new key, then the old ones.")
        for n, key in enumerate(keys, 1):
            try:
                Fernet(key.encode())
            except ValueError:
                raise CommandError(
                    f"STUDIO_ENCRYPTION_KEY: key {n} of {len(keys)} is not a Fernet key (32 url-safe "
                    "base64-encoded bytes); fix it before rotating."
                ) from None
        primary = Fernet(keys[0].encode())
        root = Path(settings.DATA_DIR)
        current = rotated = stale = 0
        failed = []
        for path in encrypted_files(root):
            name = path.relative_to(root)
            if under_primary_key(path, primary):
                current += 1
                continue
            if check:
                stale += 1
                self.stdout.write(f"old key: {name}")
                continue
            try:
                list(decrypt_chunks(path))  # every frame must decrypt before anything is replaced
                reencrypt_file(path)
                rotated += 1
            except DecryptionError as exc:  # no key reads it, or it is cut off
                cut = "cut off" in str(exc)
                failed.append(f"{name}: " + ("it is cut off (restore it from a backup)." if cut else NO_KEY))
        old_records = resealed = 0  # sealed upload reasons in the database
        for upload in Upload.objects.exclude(sealed="").only("pk", "sealed").iterator():
            name = f"upload {upload.pk} (rejection reasons, in the database)"
            try:
                primary.decrypt(upload.sealed.encode())
                continue
            except InvalidToken:
                old_records += 1
            if check:
                self.stdout.write(f"old key: {name}")
                continue
            try:
                Upload.objects.filter(pk=upload.pk).update(sealed=reseal(upload.sealed))
                resealed += 1
            except InvalidToken:
                failed.append(f"{name}: {NO_KEY}")
        summary = f"{current} file(s) already under the first key"
        summary += f", {stale} still under an old key" if check else f", {rotated} re-encrypted"
        if old_records:
            summary += (
                f"; {old_records} upload record(s) still under an old key"
                if check
                else f"; {resealed} upload record(s) re-encrypted"
            )
        self.stdout.write(summary + ".")
        for message in failed:
            self.stderr.write(message)
        if failed or (check and (stale or old_records)):
            sys.exit(1)
