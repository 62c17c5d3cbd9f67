"""Encrypted files hold binary Fernet tokens (STUDIOENC2): each is exactly what the `cryptography`
library's own Fernet accepts once base64-encoded, files of the earlier text format (STUDIOENC1) still
decrypt and rotate, and a changed or cut-off file is refused, never half-read."""

import base64
import struct
import time

import pytest
from cryptography.fernet import Fernet
from django.core.management import call_command

from datasets_app.services import storage

pytestmark = pytest.mark.django_db


def _frames(path) -> tuple[bytes, list[bytes]]:
    raw = path.read_bytes()
    magic, rest, frames = raw[: len(storage.MAGIC)], raw[len(storage.MAGIC) :], []
    while rest:
        (length,) = struct.unpack(">I", rest[:4])
        frames.append(rest[4 : 4 + length])
        rest = rest[4 + length :]
    return magic, frames


def _write_text_format(path, key: str, chunks: list[bytes]) -> None:
    """A file as the studio wrote them before STUDIOENC2: frames of Fernet token text."""
    with open(path, "wb") as out:
        out.write(storage.MAGIC_TEXT)
        for chunk in chunks:
            token = Fernet(key.encode()).encrypt(chunk)
            out.write(struct.pack(">I", len(token)) + token)


def test_every_frame_is_a_binary_fernet_token_the_library_itself_decrypts(settings):
    key = Fernet.generate_key().decode()
    settings.STUDIO_ENCRYPTION_KEY = key
    src = storage.data_path("uploads", "incoming", "plain.jsonl")
    data = bytes(range(256)) * 9000 + b"tail"  # over two 1 MiB chunks, every byte value
    src.write_bytes(data)
    dest = storage.data_path("uploads", "originals", "plain.enc")
    before = int(time.time())
    storage.encrypt_file(src, dest)
    magic, frames = _frames(dest)
    assert magic == storage.MAGIC == b"STUDIOENC2\n"
    assert len(frames) == 3
    library = Fernet(key.encode())
    assert b"".join(library.decrypt(base64.urlsafe_b64encode(t)) for t in frames) == data
    for token in frames:
        assert token[0] == 0x80  # Fernet's version byte
        assert before <= struct.unpack(">Q", token[1:9])[0] <= int(time.time())
        assert library.extract_timestamp(base64.urlsafe_b64encode(token)) >= before
    # a random IV per token: the same plaintext never gives the same bytes twice
    again = storage.data_path("uploads", "originals", "again.enc")
    storage.encrypt_file(src, again)
    assert [t[9:25] for t in _frames(again)[1]] != [t[9:25] for t in frames]
    assert b"".join(storage.decrypt_chunks(dest)) == data == b"".join(storage.decrypt_chunks(again))


def test_the_rejected_lines_writer_writes_the_same_format(settings):
    settings.STUDIO_ENCRYPTION_KEY = Fernet.generate_key().decode()
    dest = storage.data_path("uploads", "rejects", "1.rejects.enc")
    writer = storage.EncryptedWriter(dest)
    lines = [f'{{"line": {n}, "text": "caf\u00e9 {n}"}}\n'.encode() for n in range(40_000)]
    for line in lines:
        writer.write(line)
    writer.close()
    assert _frames(dest)[0] == storage.MAGIC and len(_frames(dest)[1]) >= 2
    assert b"".join(storage.decrypt_chunks(dest)) == b"".join(lines)


def test_files_of_the_earlier_text_format_still_decrypt_and_rotate_to_the_binary_one(settings, capsys):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    path = storage.data_path("uploads", "originals", "old.enc")
    _write_text_format(path, old, [b"first chunk ", b"second chunk"])
    settings.STUDIO_ENCRYPTION_KEY = old
    assert storage.is_encrypted(path)
    assert b"".join(storage.decrypt_chunks(path)) == b"first chunk second chunk"
    call_command("rotate_encryption_key", "--check")  # under the first key already: nothing to do
    assert "1 file(s) already under the first key" in capsys.readouterr().out

    settings.STUDIO_ENCRYPTION_KEY = f"{new},{old}"
    call_command("rotate_encryption_key")
    assert "1 re-encrypted" in capsys.readouterr().out
    assert _frames(path)[0] == storage.MAGIC
    settings.STUDIO_ENCRYPTION_KEY = new
    assert b"".join(storage.decrypt_chunks(path)) == b"first chunk second chunk"


@pytest.mark.parametrize("where", ["version", "timestamp", "iv", "ciphertext", "mac"])
def test_a_changed_byte_anywhere_in_a_token_is_refused(settings, where):
    settings.STUDIO_ENCRYPTION_KEY = Fernet.generate_key().decode()
    path = storage.data_path("uploads", "originals", "x.enc")
    storage.encrypt_chunks([b"a secret line of text"], path)
    raw = bytearray(path.read_bytes())
    start = len(storage.MAGIC) + 4  # the first token
    offset = {"version": 0, "timestamp": 5, "iv": 12, "ciphertext": 30, "mac": len(raw) - start - 1}[where]
    raw[start + offset] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(storage.DecryptionError, match="cannot be decrypted with the configured"):
        b"".join(storage.decrypt_chunks(path))


def test_a_cut_off_file_or_another_key_is_refused_in_words(settings):
    key = Fernet.generate_key().decode()
    settings.STUDIO_ENCRYPTION_KEY = key
    path = storage.data_path("uploads", "originals", "y.enc")
    storage.encrypt_chunks([b"one", b"two"], path)
    whole = path.read_bytes()
    for cut in (len(whole) - 1, len(whole) - 40, len(storage.MAGIC) + 2):
        path.write_bytes(whole[:cut])
        with pytest.raises(storage.DecryptionError, match="cut off"):
            b"".join(storage.decrypt_chunks(path))
    path.write_bytes(whole)
    settings.STUDIO_ENCRYPTION_KEY = Fernet.generate_key().decode()
    with pytest.raises(storage.DecryptionError, match="cannot be decrypted"):
        b"".join(storage.decrypt_chunks(path))
    settings.STUDIO_ENCRYPTION_KEY = f"{Fernet.generate_key().decode()},{key}"  # an older key still reads it
    assert b"".join(storage.decrypt_chunks(path)) == b"onetwo"
    path.write_bytes(b"not encrypted at all")
    assert not storage.is_encrypted(path)
    with pytest.raises(storage.DecryptionError, match="not an encrypted studio file"):
        b"".join(storage.decrypt_chunks(path))
