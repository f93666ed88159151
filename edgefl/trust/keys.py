"""Key files and key ids: the server's Ed25519 signing key and X25519 sealing key.

Private keys are stored as PEM (PKCS#8, unencrypted: the server must start unattended), created
with mode 0600 and refused when group or others may read them. Public keys travel as 32 raw bytes
(hex in JSON files); a *key id* is the first 8 bytes of SHA-256 over those raw bytes, carried in
every signed message and sealed update so a receiver can tell which key was meant.
"""
from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from edgefl.durable import create_file

from .errors import KeyFileError

KEY_ID_BYTES = 8
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


def raw_public(key) -> bytes:
    """The 32 raw bytes of an Ed25519 or X25519 public key (or of a private key's public half)."""
    if isinstance(key, (Ed25519PrivateKey, X25519PrivateKey)):
        key = key.public_key()
    return key.public_bytes(**_RAW)


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


def write_private_key(path, key) -> Path:
    """Write ``key`` as PEM to a new file of mode 0600; never overwrites an existing file.

    Raises
    ------
    FileExistsError
        If ``path`` exists (a key is never replaced silently: delete it deliberately first).
    """
    path = Path(path)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if not create_file(path, pem, mode=0o600):
        raise FileExistsError(f"{path} exists: a key is never replaced silently; delete it "
                              "deliberately first")
    return path


def load_private_key(path, kind: type):
    """Read a private key of ``kind`` (``Ed25519PrivateKey`` or ``X25519PrivateKey``).

    Raises
    ------
    KeyFileError
        If the file is missing, readable by group or others, not PEM, or another kind of key.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read the key file {path}: {exc.strerror}; run `edgefl fleet "
                           "init` or pass the fleet directory it created") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"the private key {path} is accessible to other users (mode "
                           f"{stat.S_IMODE(mode):04o}): run `chmod 600 {path}` and consider the "
                           "key compromised if others could read it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, kind):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected {kind.__name__}")
    return key
