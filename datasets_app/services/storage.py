"""Files under the data dir: uploads in flight, encrypted originals and rejected lines.

Encryption is Fernet (STUDIO_ENCRYPTION_KEY), applied in 1 MiB chunks so a 200 MB upload is never
held in memory: the file is a sequence of `<4-byte big-endian length><Fernet token>` frames.
Several comma-separated keys may be configured: the first encrypts, all decrypt (rotation).

Files start with MAGIC ("STUDIOENC2"): their tokens are stored as Fernet's binary token (the bytes
whose url-safe base64 is the usual token text), which saves the base64 pass and the copies around it
(encrypting took about 7 ms per MiB with ``Fernet.encrypt``, 1.6 ms this way, in a worker that also
imports the file). Decryption base64-encodes a frame and hands it to ``MultiFernet.decrypt``, so the
library checks every token. Files written before ("STUDIOENC1", token text) still decrypt.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.hmac import HMAC
from django.conf import settings

CHUNK = 1024 * 1024
MAGIC = b"STUDIOENC2\n"  # frames hold binary Fernet tokens
MAGIC_TEXT = b"STUDIOENC1\n"  # frames hold Fernet token text (files written before STUDIOENC2)
MAGICS = (MAGIC, MAGIC_TEXT)


class DecryptionError(Exception):
    pass


def data_path(*parts: str) -> Path:
    path = Path(settings.DATA_DIR).joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def new_upload_path(suffix: str) -> Path:
    return data_path("uploads", "incoming", f"{uuid.uuid4().hex}{suffix}")


def _keys() -> list[str]:
    return [k.strip() for k in settings.STUDIO_ENCRYPTION_KEY.split(",") if k.strip()]


def _fernet() -> MultiFernet:
    return MultiFernet([Fernet(k.encode()) for k in _keys()])


class _TokenMaker:
    """Fernet tokens under the first configured key, as binary: version byte 0x80, the time in
    seconds (8 bytes, big-endian), a random 16-byte IV, the AES-128-CBC ciphertext of the PKCS7-padded
    data, and the HMAC-SHA256 of all of these (Fernet's specification; its url-safe base64 is the
    token ``Fernet(key).encrypt`` would have made with that time and IV)."""

    def __init__(self):
        key = base64.urlsafe_b64decode(_keys()[0].encode())
        if len(key) != 32:
            raise ValueError("Fernet key must be 32 url-safe base64-encoded bytes.")
        self._signing, self._encryption = key[:16], key[16:]

    def token(self, data: bytes) -> bytes:
        iv = os.urandom(16)
        padder = padding.PKCS7(algorithms.AES.block_size).padder()
        encryptor = Cipher(algorithms.AES(self._encryption), modes.CBC(iv)).encryptor()
        body = b"".join(
            (
                b"\x80",
                struct.pack(">Q", int(time.time())),
                iv,
                encryptor.update(padder.update(data)),
                encryptor.update(padder.finalize()),
                encryptor.finalize(),
            )
        )
        mac = HMAC(self._signing, hashes.SHA256())
        mac.update(body)
        return body + mac.finalize()


def encrypt_chunks(chunks: Iterable[bytes], dest: Path) -> None:
    """Write chunks encrypted to `dest` atomically (temp file + rename)."""
    maker = _TokenMaker()
    tmp = dest.with_name(dest.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(MAGIC)
        for chunk in chunks:
            if not chunk:
                continue
            token = maker.token(chunk)
            out.write(struct.pack(">I", len(token)))
            out.write(token)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)


def encrypt_file(src: Path, dest: Path) -> None:
    def read() -> Iterator[bytes]:
        with open(src, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    encrypt_chunks(read(), dest)


def is_encrypted(path: Path) -> bool:
    """Whether the file starts like a studio encrypted file (either format)."""
    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) in MAGICS


def tokens(path: Path) -> Iterator[bytes]:
    """The file's frames as Fernet token text, in order (not yet checked or decrypted)."""
    with open(path, "rb") as fh:
        magic = fh.read(len(MAGIC))
        if magic not in MAGICS:
            raise DecryptionError(f"{path.name} is not an encrypted studio file")
        while header := fh.read(4):
            (length,) = struct.unpack(">I", header) if len(header) == 4 else (-1,)
            token = fh.read(length) if length >= 0 else b""
            if length < 0 or len(token) < length:
                raise DecryptionError(f"{path.name} is cut off (an incomplete frame at its end)")
            yield base64.urlsafe_b64encode(token) if magic == MAGIC else token


def decrypt_chunks(path: Path) -> Iterator[bytes]:
    f = _fernet()
    for token in tokens(path):
        try:
            yield f.decrypt(token)
        except InvalidToken:
            raise DecryptionError(
                f"{path.name} cannot be decrypted with the configured STUDIO_ENCRYPTION_KEY"
            ) from None


def seal(value) -> str:
    """A small JSON value encrypted for a database column (a Fernet token, text)."""
    return _fernet().encrypt(json.dumps(value, ensure_ascii=False).encode()).decode()


def unseal(token: str, default=None):
    """The value of ``seal``; ``default`` when empty or when no configured key decrypts it."""
    if not token:
        return default
    try:
        return json.loads(_fernet().decrypt(token.encode()))
    except InvalidToken:
        return default


def reseal(token: str) -> str:
    """The same value under the first configured key (key rotation)."""
    return _fernet().rotate(token.encode()).decode()


def reencrypt_file(path: Path) -> None:
    """Rotate a file to the first configured key (used by `manage.py rotate_encryption_key`)."""
    encrypt_chunks(decrypt_chunks(path), path)


def remove_quietly(path: str | Path | None) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


class EncryptedWriter:
    """Append bytes; they are encrypted in CHUNK-sized frames. Use as a context manager."""

    def __init__(self, dest: Path):
        self.dest = dest
        self._maker = _TokenMaker()
        self._tmp = dest.with_name(dest.name + ".part")
        self._fh = os.fdopen(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        self._fh.write(MAGIC)
        self._buf = bytearray()
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        self._buf += data
        self.bytes_written += len(data)
        if len(self._buf) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            token = self._maker.token(bytes(self._buf))
            self._fh.write(struct.pack(">I", len(token)))
            self._fh.write(token)
            self._buf.clear()

    def close(self, keep: bool = True) -> None:
        self._flush()
        self._fh.close()
        if keep:
            os.replace(self._tmp, self.dest)
        else:
            remove_quietly(self._tmp)

    def __enter__(self) -> EncryptedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(keep=exc_type is None)
