"""Public keys and key ids: the server's Ed25519 signing key and X25519 sealing key.

Public keys travel as 32 raw bytes (hex in JSON files); a *key id* is the first 8 bytes of
SHA-256 over those raw bytes, carried in every signed message and sealed update so a receiver
can tell which key was meant. (Private key files are the server's: :mod:`edgefl_server.key_files`.
A device holds no private key, and its import of ``cryptography`` stays small: no PEM or
certificate machinery is loaded here.)
"""
from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey


from .errors import KeyFileError

KEY_ID_BYTES = 8


def raw_public(key) -> bytes:
    """The 32 raw bytes of an Ed25519 or X25519 public key (or of a private key's public half)."""
    if isinstance(key, (Ed25519PrivateKey, X25519PrivateKey)):
        key = key.public_key()
    return key.public_bytes_raw()


def key_id(key) -> bytes:
    """First 8 bytes of SHA-256 over the raw public key: names a key without revealing more."""
    return hashlib.sha256(raw_public(key)).digest()[:KEY_ID_BYTES]


def signing_public_key(data) -> Ed25519PublicKey:
    """An Ed25519 public key from 32 raw bytes or their hex spelling."""
    return Ed25519PublicKey.from_public_bytes(_raw32(data, "signing"))


def sealing_public_key(data) -> X25519PublicKey:
    """An X25519 public key from 32 raw bytes or their hex spelling."""
    return X25519PublicKey.from_public_bytes(_raw32(data, "sealing"))


def _raw32(data, what: str) -> bytes:
    if isinstance(data, str):
        try:
            data = bytes.fromhex(data)
        except ValueError:
            raise KeyFileError(f"the server's {what} public key {data[:16]!r}... is not hex") from None
    if len(data) != 32:
        raise KeyFileError(f"the server's {what} public key has {len(data)} bytes, not 32: copy "
                           "it again from the fleet's device bundle")
    return bytes(data)
