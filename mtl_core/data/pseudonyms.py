"""Pseudonymous user ids: raw user ids stay in the warehouse, everything downstream sees a keyed hash.

Extraction replaces every ``user_id`` with ``HMAC-SHA256(key, "user:<id>")`` cut to 53 bits, so snapshots,
examples, model files, MLflow input examples and the registry hold no raw id, and nobody without the key
can map a pseudonym back (or forward: hashing a guessed id needs the key too). The same key maps a raw id
at serving time, and the oracle uses it to join the shop's truth, which is keyed by raw id.

The key is a secret. It comes from ``privacy.pseudonym_key`` (``MTL_PRIVACY__PSEUDONYM_KEY``), from the
Airflow Connection ``mtl_pseudonym_key`` (its password) in the DAG, or, on the embedded default, from a
key file created once under ``<data_dir>/secrets/`` with mode 0600. It is never logged or written
anywhere else: the manifest and the registry carry only its ``key_id``, a fingerprint that tells whether
two snapshots were pseudonymised with the same key without revealing it. A new key gives every user a new
pseudonym, so history features restart and learned user embeddings no longer match: rotate it on purpose.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mtl_core.config import Settings
from mtl_core.errors import MtlError

KEY_FILE = Path("secrets") / "pseudonym.key"
# The columns extraction pseudonymises, wherever a table has them.
USER_ID_COLUMNS = ("user_id",)
_MIN_KEY_BYTES = 16
# 53 bits: a pseudonym survives a float64 (pandas turns an id column with a gap into floats) and JSON readers
# that parse numbers as doubles. Two of a million users share one with probability 6e-5 (their histories merge).
PSEUDONYM_BITS = 53


class PseudonymKeyError(MtlError):
    """The pseudonymisation key is missing, too short, or unreadable."""


class Pseudonymiser:
    """Raw user id -> stable 53-bit pseudonym under one secret key."""

    def __init__(self, key: str | bytes):
        key_bytes = key.encode() if isinstance(key, str) else bytes(key)
        if len(key_bytes) < _MIN_KEY_BYTES:
            raise PseudonymKeyError(
                f"the pseudonymisation key has {len(key_bytes)} bytes; use at least {_MIN_KEY_BYTES} random bytes "
                "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )
        self._key = key_bytes
        self._cache: dict[int, int] = {}
        # A fingerprint, not the key: HMAC of a fixed label (one-way, so it reveals nothing about the key).
        self.key_id = hmac.new(key_bytes, b"mtl pseudonym key id", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:  # never the key
        return f"Pseudonymiser(key_id={self.key_id})"

    def one(self, user_id: int) -> int:
        value = self._cache.get(user_id)
        if value is None:
            digest = hmac.new(self._key, b"user:%d" % int(user_id), hashlib.sha256).digest()
            value = int.from_bytes(digest[:8], "big") >> (64 - PSEUDONYM_BITS)
            if len(self._cache) < 5_000_000:
                self._cache[user_id] = value
        return value

    def values(self, user_ids: Iterable[int | None]) -> list[int | None]:
        """Pseudonyms of a column's values; None (a NULL id) stays None, for validation to report."""
        return [None if v is None else self.one(v) for v in user_ids]

    def array(self, user_ids: np.ndarray) -> np.ndarray:
        """Pseudonyms of an integer array (int64 out)."""
        ids = np.asarray(user_ids)
        unique, inverse = np.unique(ids, return_inverse=True)
        mapped = np.fromiter((self.one(int(v)) for v in unique), dtype=np.int64, count=len(unique))
        return mapped[inverse].reshape(ids.shape)


def _key_file(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_FILE


def load_or_create_key(data_dir: Path) -> str:
    """The embedded default's key: read ``<data_dir>/secrets/pseudonym.key``, creating it once if missing.

    Created with mode 0600 through a private temporary file and a hard link, so two first runs at once both
    end up with the one key that won the link.
    """
    path = _key_file(data_dir)
    if not path.exists():
        try:
            _create_key_file(path)
        except OSError as exc:
            raise PseudonymKeyError(
                f"cannot create the pseudonymisation key file {path}: {exc.strerror or exc}; make {path.parent} "
                "writable, or set the key with MTL_PRIVACY__PSEUDONYM_KEY"
            ) from None
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise PseudonymKeyError(f"cannot read the pseudonymisation key file {path}: {exc.strerror}") from None
    if not key:
        raise PseudonymKeyError(f"the pseudonymisation key file {path} is empty; delete it to create a new key")
    return key


def _create_key_file(path: Path) -> None:
    """Write a new random key beside ``path`` and link it into place (the first process to link wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    finally:
        tmp.unlink(missing_ok=True)


def pseudonymiser_for(settings: Settings) -> Pseudonymiser:
    """The key of ``privacy.pseudonym_key`` if set, else the installation's key file."""
    configured = settings.privacy.pseudonym_key.get_secret_value()
    return Pseudonymiser(configured or load_or_create_key(settings.data_dir))
