"""Sealed updates: a device encrypts each update to the server's X25519 public key.

The broker (and whoever operates it) routes ciphertext only. A device draws an ephemeral X25519
key; its shared secret with the server's key goes through HKDF-SHA256 into a ChaCha20-Poly1305
key, and every update is encrypted under that key with a fresh random 96-bit nonce. The clear
header (fleet, client id, round, the server key's id, the ephemeral public key and the nonce)
is the AEAD's associated data, so a sealed update cannot be moved to another fleet, device or
round without failing authentication. ``docs/wire-format.md`` (Sealed update) gives the layout
byte by byte::

    "EFLX" | version | suite | fleet length | client id length | round | recipient key id
           | ephemeral public key | nonce | fleet | client id | ChaCha20-Poly1305(update) + tag

One key agreement per ephemeral key, not per update: a :class:`Sealer` keeps its ephemeral key
for :data:`MESSAGES_PER_EPHEMERAL_KEY` updates (random nonces stay far from colliding), and an
:class:`Opener` remembers the AEAD key of each ephemeral key it has seen, so sealing and opening
cost one AEAD pass over the update, a small fraction of ingesting it.

Sealing hides what a device sent from the broker; it does not hide *that* it sent, when, how
much, or for which round.
"""
from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
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
#: Suite 1: X25519 key agreement, HKDF-SHA256, ChaCha20-Poly1305 with random 96-bit nonces.
SUITE = 1
TAG_BYTES = 16
NONCE_BYTES = 12
_INFO = b"edgefl sealed update v1"
_HEADER = struct.Struct("<4sBBBBI8s32s12s")
HEADER_BYTES = _HEADER.size  # 64
#: Updates sealed under one ephemeral key before a :class:`Sealer` draws a new one (2^32 random
#: nonces is the usual bound for one ChaCha20-Poly1305 key; this stays far below it).
MESSAGES_PER_EPHEMERAL_KEY = 1 << 20


@dataclass(frozen=True)
class SealedHeader:
    """The clear part of a sealed update."""

    fleet: str
    client_id: str
    round_id: int
    recipient_key_id: bytes
    ephemeral_public: bytes
    nonce: bytes


def _aead(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> ChaCha20Poly1305:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral_public + recipient_public,
               info=_INFO).derive(shared)
    return ChaCha20Poly1305(key)


def _ascii(kind: str, value: str) -> bytes:
    data = value.encode("ascii")
    if not 1 <= len(data) <= 64:
        raise ValueError(f"{kind} {value!r} must be 1-64 ASCII characters")
    return data


class Sealer:
    """The device side: seals updates to one server key.

    Parameters
    ----------
    recipient : X25519PublicKey
        The server's sealing key (from the device bundle).
    ephemeral : X25519PrivateKey, optional
        Only for test vectors; drawn fresh otherwise (and again every
        :data:`MESSAGES_PER_EPHEMERAL_KEY` updates).
    """

    def __init__(self, recipient: X25519PublicKey, *, ephemeral: X25519PrivateKey | None = None):
        self.recipient = recipient
        self._recipient_public = raw_public(recipient)
        self._recipient_id = key_id(recipient)
        self._lock = threading.Lock()
        self._new_ephemeral(ephemeral)

    def _new_ephemeral(self, ephemeral=None) -> None:
        ephemeral = ephemeral or X25519PrivateKey.generate()
        self._ephemeral_public = raw_public(ephemeral)
        self._aead = _aead(ephemeral.exchange(self.recipient), self._ephemeral_public,
                           self._recipient_public)
        self._used = 0

    def seal(self, plaintext: bytes, *, fleet: str, client_id: str, round_id: int,
             nonce: bytes | None = None) -> bytes:
        """Seal ``plaintext`` (an encoded update) for ``client_id`` of ``fleet`` in ``round_id``.

        ``nonce`` is only for test vectors (12 random bytes otherwise).
        """
        f, c = _ascii("fleet", fleet), _ascii("client id", client_id)
        if not 0 <= round_id < 2**32:
            raise ValueError(f"round id {round_id} does not fit 32 bits")
        nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
        with self._lock:
            if self._used >= MESSAGES_PER_EPHEMERAL_KEY:
                self._new_ephemeral()
            self._used += 1
            header = _HEADER.pack(MAGIC, FORMAT_VERSION, SUITE, len(f), len(c), round_id,
                                  self._recipient_id, self._ephemeral_public, nonce) + f + c
            aead = self._aead
        return header + aead.encrypt(nonce, bytes(plaintext), header)


def seal(plaintext: bytes, recipient: X25519PublicKey, *, fleet: str, client_id: str,
         round_id: int) -> bytes:
    """Seal one update with a key of its own (a :class:`Sealer` reuses one for many)."""
    return Sealer(recipient).seal(plaintext, fleet=fleet, client_id=client_id, round_id=round_id)


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
    magic, version, suite, flen, clen, round_id, kid, eph, nonce = _HEADER.unpack_from(data)
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
    return SealedHeader(fleet, client_id, round_id, bytes(kid), bytes(eph), bytes(nonce)), start


class Opener:
    """The server side: opens updates sealed to its private key.

    Parameters
    ----------
    private_key : X25519PrivateKey
    cache_size : int
        AEAD keys of this many ephemeral keys are remembered (one key agreement each).
    """

    def __init__(self, private_key: X25519PrivateKey, *, cache_size: int = 4096):
        self._key = private_key
        self._public = raw_public(private_key)
        self.key_id = key_id(private_key)
        self._cache: OrderedDict[bytes, ChaCha20Poly1305] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _aead_for(self, ephemeral_public: bytes) -> ChaCha20Poly1305:
        with self._lock:
            aead = self._cache.get(ephemeral_public)
            if aead is not None:
                self._cache.move_to_end(ephemeral_public)
                return aead
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        except ValueError:  # a low-order point gives an all-zero secret, which cryptography refuses
            raise SealError("the sealed update's ephemeral key is invalid") from None
        aead = _aead(shared, ephemeral_public, self._public)
        with self._lock:
            self._cache[ephemeral_public] = aead
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return aead

    def open(self, sealed, *, fleet: str, client_id: str,
             parsed: tuple[SealedHeader, int] | None = None) -> tuple[SealedHeader, bytes]:
        """Open an update sealed by ``client_id`` of ``fleet``; the clear header and the update.

        ``parsed`` is :func:`parse_sealed` of ``sealed``, when the caller has it already (to
        choose the opener of the key the header names).

        Raises
        ------
        SealError
            Malformed, sealed for another fleet, device or key, or altered (authentication fails).
        """
        header, start = parsed if parsed is not None else parse_sealed(sealed)
        if header.fleet != fleet or header.client_id != client_id:
            raise SealError(f"sealed for {header.client_id!r} of fleet {header.fleet!r}, but "
                            f"arrived from {client_id!r} of fleet {fleet!r}")
        if header.recipient_key_id != self.key_id:
            raise SealError(f"sealed to key {header.recipient_key_id.hex()}, but this server's "
                            f"sealing key is {self.key_id.hex()}: the device holds another "
                            "fleet's (or an old) sealing key; re-provision it")
        data = bytes(sealed)
        try:
            return header, self._aead_for(header.ephemeral_public).decrypt(
                header.nonce, data[start:], data[:start])
        except InvalidTag:
            raise SealError("the sealed update fails authentication: altered in transit, or its "
                            "clear header (round, device) was changed") from None


def open_sealed(sealed, private_key: X25519PrivateKey, *, fleet: str,
                client_id: str) -> tuple[SealedHeader, bytes]:
    """Open one sealed update (an :class:`Opener` remembers key agreements across many)."""
    return Opener(private_key, cache_size=1).open(sealed, fleet=fleet, client_id=client_id)
