"""Sealed updates: a device encrypts each update to the server's X25519 public key.

The broker (and whoever operates it) routes ciphertext only. Each update is sealed with a fresh
ephemeral X25519 key: the shared secret with the server's key goes through HKDF-SHA256 into a
ChaCha20-Poly1305 key and nonce, used exactly once. The clear header (fleet, client id, round,
the server key's id and the ephemeral public key) is the AEAD's associated data, so a sealed
update cannot be moved to another fleet, device or round without failing authentication.
``docs/wire-format.md`` (Sealed update) gives the layout byte by byte::

    "EFLX" | version | suite | fleet length | client id length | round | recipient key id
           | ephemeral public key | fleet | client id | ChaCha20-Poly1305(update) with 16-byte tag

Sealing hides what a device sent from the broker; it does not hide *that* it sent, when, how
much, or for which round.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SealError
from .keys import key_id, raw_public

MAGIC = b"EFLX"
FORMAT_VERSION = 1
#: Suite 1: X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305.
SUITE = 1
TAG_BYTES = 16
_INFO = b"edgefl sealed update v1"
_HEADER = struct.Struct("<4sBBBBI8s32s")
HEADER_BYTES = _HEADER.size  # 52


@dataclass(frozen=True)
class SealedHeader:
    """The clear part of a sealed update."""

    fleet: str
    client_id: str
    round_id: int
    recipient_key_id: bytes
    ephemeral_public: bytes


def _key_and_nonce(shared: bytes, ephemeral_public: bytes, recipient_public: bytes):
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=ephemeral_public + recipient_public,
               info=_INFO).derive(shared)
    return okm[:32], okm[32:]


def seal(plaintext: bytes, recipient: X25519PublicKey, *, fleet: str, client_id: str,
         round_id: int, ephemeral: X25519PrivateKey | None = None) -> bytes:
    """Seal ``plaintext`` (an encoded update) to the server's public key.

    Parameters
    ----------
    ephemeral : X25519PrivateKey, optional
        Only for test vectors: a fresh key is generated for every call otherwise, and reusing one
        would reuse the AEAD key and nonce.
    """
    f, c = fleet.encode("ascii"), client_id.encode("ascii")
    if not (1 <= len(f) <= 64 and 1 <= len(c) <= 64):
        raise ValueError("fleet and client id must be 1-64 ASCII characters")
    if not 0 <= round_id < 2**32:
        raise ValueError(f"round id {round_id} does not fit 32 bits")
    ephemeral = ephemeral or X25519PrivateKey.generate()
    eph_public, recipient_public = raw_public(ephemeral), raw_public(recipient)
    key, nonce = _key_and_nonce(ephemeral.exchange(recipient), eph_public, recipient_public)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, SUITE, len(f), len(c), round_id,
                          key_id(recipient), eph_public) + f + c
    return header + ChaCha20Poly1305(key).encrypt(nonce, bytes(plaintext), header)


def parse_sealed(sealed) -> tuple[SealedHeader, int]:
    """The clear header of a sealed update and where its ciphertext starts (nothing decrypted).

    Raises
    ------
    SealError
        If the bytes are not a sealed update of a known version and suite.
    """
    data = memoryview(sealed)
    if len(data) < HEADER_BYTES + 2 + TAG_BYTES or bytes(data[:4]) != MAGIC:
        raise SealError(f"not a sealed update ({len(data)} bytes starting {bytes(data[:4])!r}, "
                        f"expected {MAGIC!r}): devices of this fleet must seal their updates "
                        "(a device without the fleet's sealing key needs re-provisioning)")
    magic, version, suite, flen, clen, round_id, kid, eph = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION or suite != SUITE:
        raise SealError(f"sealed update version {version} suite {suite} is not supported (this "
                        f"edgefl reads version {FORMAT_VERSION} suite {SUITE}); upgrade the older side")
    start = HEADER_BYTES + flen + clen
    if not flen or not clen or len(data) < start + TAG_BYTES:
        raise SealError("sealed update truncated or with an empty fleet or client id")
    try:
        fleet = bytes(data[HEADER_BYTES:HEADER_BYTES + flen]).decode("ascii")
        client_id = bytes(data[HEADER_BYTES + flen:start]).decode("ascii")
    except UnicodeDecodeError:
        raise SealError("the fleet or client id of a sealed update is not ASCII") from None
    return SealedHeader(fleet, client_id, round_id, bytes(kid), bytes(eph)), start


def open_sealed(sealed, private_key: X25519PrivateKey, *, fleet: str,
                client_id: str) -> tuple[SealedHeader, bytes]:
    """Open an update sealed to ``private_key`` by ``client_id`` of ``fleet``.

    Returns the clear header (with the round it was sealed for) and the plaintext update.

    Raises
    ------
    SealError
        Malformed, sealed for another fleet, device or key, or altered (authentication fails).
    """
    header, start = parse_sealed(sealed)
    if header.fleet != fleet or header.client_id != client_id:
        raise SealError(f"sealed for {header.client_id!r} of fleet {header.fleet!r}, but arrived "
                        f"from {client_id!r} of fleet {fleet!r}")
    recipient_public = raw_public(private_key)
    if header.recipient_key_id != key_id(private_key):
        raise SealError(f"sealed to key {header.recipient_key_id.hex()}, but this server's "
                        f"sealing key is {key_id(private_key).hex()}: the device holds another "
                        "fleet's (or an old) sealing key; re-provision it")
    data = bytes(sealed)
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(header.ephemeral_public))
    except ValueError:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise SealError("the sealed update's ephemeral key is invalid") from None
    key, nonce = _key_and_nonce(shared, header.ephemeral_public, recipient_public)
    try:
        return header, ChaCha20Poly1305(key).decrypt(nonce, data[start:], data[:start])
    except InvalidTag:
        raise SealError("the sealed update fails authentication: altered in transit, or its "
                        "clear header (round, device) was changed") from None
