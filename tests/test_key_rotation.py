"""`manage.py rotate_encryption_key`: files move to the first key, stay readable, and old-key-only
configurations are caught by --check."""

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command

from datasets_app.services.storage import data_path, decrypt_chunks, encrypt_chunks, seal, unseal

pytestmark = pytest.mark.django_db


def _read(path) -> bytes:
    return b"".join(decrypt_chunks(path))


def test_rotation_reencrypts_with_the_new_key_and_check_reports(settings, capsys):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.STUDIO_ENCRYPTION_KEY = old
    first = data_path("uploads", "originals", "a.enc")
    second = data_path("uploads", "rejected", "b.enc")
    encrypt_chunks([b"hello " * 1000, b"world"], first)
    encrypt_chunks([b"rejected line"], second)
    plain = data_path("jobs", "1", "config.json")
    plain.write_text("{}")

    settings.STUDIO_ENCRYPTION_KEY = f"{new},{old}"
    with pytest.raises(SystemExit) as stop:
        call_command("rotate_encryption_key", "--check")
    assert stop.value.code == 1
    assert "2 still under an old key" in capsys.readouterr().out

    call_command("rotate_encryption_key")
    assert "0 file(s) already under the first key, 2 re-encrypted." in capsys.readouterr().out
    call_command("rotate_encryption_key")  # idempotent
    assert "2 file(s) already under the first key, 0 re-encrypted." in capsys.readouterr().out

    settings.STUDIO_ENCRYPTION_KEY = new  # the old key can now be dropped
    assert _read(first) == b"hello " * 1000 + b"world"
    assert _read(second) == b"rejected line"
    assert plain.read_text() == "{}"
    call_command("rotate_encryption_key", "--check")


def test_a_file_no_key_can_read_is_reported_and_left_alone(settings, capsys):
    settings.STUDIO_ENCRYPTION_KEY = Fernet.generate_key().decode()
    path = data_path("uploads", "originals", "lost.enc")
    encrypt_chunks([b"secret"], path)
    before = path.read_bytes()
    settings.STUDIO_ENCRYPTION_KEY = Fernet.generate_key().decode()
    with pytest.raises(SystemExit):
        call_command("rotate_encryption_key")
    assert "no configured key decrypts it" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_sealed_rejection_reasons_in_the_database_rotate_too(settings, capsys, curator):
    from datasets_app.models import Upload
    from datasets_app.services import datasets

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.STUDIO_ENCRYPTION_KEY = old
    dataset = datasets.create_dataset("Keys", "sft", curator)
    upload = Upload.objects.create(
        dataset=dataset, original_name="x.jsonl", sealed=seal({"reasons": ["why"]})
    )
    settings.STUDIO_ENCRYPTION_KEY = f"{new},{old}"
    with pytest.raises(SystemExit):
        call_command("rotate_encryption_key", "--check")
    assert "1 upload record(s) still under an old key" in capsys.readouterr().out
    call_command("rotate_encryption_key")
    assert "1 upload record(s) re-encrypted" in capsys.readouterr().out
    settings.STUDIO_ENCRYPTION_KEY = new
    upload.refresh_from_db()
    assert unseal(upload.sealed) == {"reasons": ["why"]}
    call_command("rotate_encryption_key", "--check")
