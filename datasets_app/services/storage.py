"""Files under the data dir: uploads in flight, encrypted originals and rejected lines.

Encryption is Fernet (STUDIO_ENCRYPTION_KEY), applied in 1 MiB chunks so a 200 MB upload is never
held in memory: the file is a sequence of `<4-byte big-endian length><Fernet token>` frames.
Several comma-separated keys may be configured: the first encrypts, all decrypt (rotation).
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

CHUNK = 1024 * 1024
MAGIC = b"STUDIOENC1\n"


class DecryptionError(Exception):
    pass


def data_path(*parts: str) -> Path:
    path = Path(settings.DATA_DIR).joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def new_upload_path(suffix: str) -> Path:
    return data_path("uploads", "incoming", f"{uuid.uuid4().hex}{suffix}")


def _fernet() -> MultiFernet:
    keys = [k.strip() for k in settings.STUDIO_ENCRYPTION_KEY.split(",") if k.strip()]
    return MultiFernet([Fernet(k.encode()) for k in keys])


def encrypt_chunks(chunks: Iterable[bytes], dest: Path) -> None:
    """Write chunks encrypted to `dest` atomically (temp file + rename)."""
    f = _fernet()
    tmp = dest.with_name(dest.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(MAGIC)
        for chunk in chunks:
            if not chunk:
                continue
            token = f.encrypt(chunk)
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


def decrypt_chunks(path: Path) -> Iterator[bytes]:
    f = _fernet()
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise DecryptionError(f"{path.name} is not an encrypted studio file")
        while header := fh.read(4):
            if len(header) < 4:
                raise DecryptionError(f"{path.name} is cut off (an incomplete frame at its end)")
            (length,) = struct.unpack(">I", header)
            token = fh.read(length)
            try:
                yield f.decrypt(token)
            except InvalidToken:
                raise DecryptionError(
                    f"{path.name} cannot be decrypted with the configured STUDIO_ENCRYPTION_KEY"
                )


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
        self._fernet = _fernet()
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
            token = self._fernet.encrypt(bytes(self._buf))
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
