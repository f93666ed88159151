"""What every binary edgefl message shares: the format version and the trailing checksum.

Every message ends in an 8-byte checksum, the first 8 bytes of SHA-256 over everything before it
(an integrity check against corruption, not an authentication). ``docs/wire-format.md``.
"""
from __future__ import annotations

import hashlib

FORMAT_VERSION = 1
CHECKSUM_BYTES = 8


def checksum(data) -> bytes:
    """The checksum of ``data`` (bytes-like) that ends a message."""
    return hashlib.sha256(data).digest()[:CHECKSUM_BYTES]
