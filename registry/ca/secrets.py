"""Encryption at rest of the CA's root private keys.

A root key is stored only as a Fernet token (AES-128-CBC + HMAC-SHA256,
`cryptography`'s authenticated recipe), prefixed `fernet:` so that another
scheme can be added later without guessing.

The key comes from the environment:

- `MESH_ENCRYPTION_KEY`: one or more Fernet keys (32 url-safe base64 bytes,
  as `cryptography.fernet.Fernet.generate_key()` prints), comma-separated.
  The first encrypts; every one decrypts. To change keys, put the new one
  first and keep the old one listed while roots encrypted with it exist
  (new roots, from the next rotation on, are written with the first key).
- unset: a key derived from `MESH_SECRET_KEY` (Django's SECRET_KEY) with
  HKDF-SHA256 (salt `meshweb-ca-keys`, info `meshweb ca root key encryption v1`).
  Servers sharing one database must then share `MESH_SECRET_KEY`.

Decryption with the wrong key fails loudly (`KeyDecryptionError`), never
with a garbled key.
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

PREFIX = "fernet:"
HKDF_SALT = b"meshweb-ca-keys"
HKDF_INFO = b"meshweb ca root key encryption v1"


class KeyDecryptionError(Exception):
    """A stored key could not be decrypted with the configured key(s)."""


def derive_key(secret: str) -> bytes:
    """The Fernet key HKDF-SHA256 derives from a secret (used when MESH_ENCRYPTION_KEY is unset)."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=HKDF_INFO).derive(
        secret.encode()
    )
    return base64.urlsafe_b64encode(raw)


def _parse_keys(value: str) -> list[bytes]:
    keys = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            if len(base64.urlsafe_b64decode(part.encode())) != 32:
                raise ValueError
        except (ValueError, binascii.Error):
            raise ImproperlyConfigured(
                "MESH_ENCRYPTION_KEY: each key must be a Fernet key (32 url-safe base64 bytes, "
                'e.g. python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())")'
            ) from None
        keys.append(part.encode())
    if not keys:
        raise ImproperlyConfigured("MESH_ENCRYPTION_KEY is set but holds no key")
    return keys


@lru_cache(maxsize=4)
def _fernet(encryption_key: str, secret_key: str) -> MultiFernet:
    keys = _parse_keys(encryption_key) if encryption_key else [derive_key(secret_key)]
    return MultiFernet([Fernet(k) for k in keys])


def fernet() -> MultiFernet:
    """The configured cipher (raises ImproperlyConfigured on a malformed key)."""
    return _fernet(settings.MESH_ENCRYPTION_KEY or "", settings.SECRET_KEY)


def encrypt(plaintext: str) -> str:
    """Encrypt a PEM private key for storage."""
    return PREFIX + fernet().encrypt(plaintext.encode()).decode()


def decrypt(stored: str) -> str:
    """Decrypt a stored private key; KeyDecryptionError if the key does not fit."""
    if not stored.startswith(PREFIX):
        raise KeyDecryptionError("stored CA key has an unknown format (expected fernet:...)")
    try:
        return fernet().decrypt(stored[len(PREFIX) :].encode()).decode()
    except InvalidToken:
        raise KeyDecryptionError(
            "cannot decrypt the CA root private key: MESH_ENCRYPTION_KEY (or, when unset, "
            "MESH_SECRET_KEY) differs from the one it was encrypted with"
        ) from None
