"""The server's private key files: its Ed25519 signing key and X25519 sealing key (and the CA's
and broker's keys that provisioning writes).

Stored as PEM (PKCS#8, unencrypted: the server must start unattended), created with mode 0600,
never overwritten, and refused when group or others may read them.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from edgefl.trust import KeyFileError


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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
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
