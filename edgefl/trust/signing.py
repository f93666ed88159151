"""Signed server messages: one frame around a model envelope, announcement, receipt or key notice.

The server signs the *exact bytes* of every message it publishes, together with what the
message is for: the fleet, the kind of message, the device it is addressed to (receipts), a
sequence number that only grows, and the time it was issued. A signature for one fleet, kind or
device therefore cannot be replayed as another, and an old message cannot pass as a new one
(``docs/wire-format.md``, Signed message, gives the layout byte by byte)::

    "EFLS" | version | kind | fleet length | subject length | sequence | issued (us) | key id
           | payload length | fleet | subject | payload | Ed25519 signature

The signature covers the frame's header, fleet and subject followed by the SHA-256 of the
payload (not the payload itself): Ed25519 hashes what it signs with SHA-512, which over a large
model envelope costs twice as much as SHA-256 does where the CPU has SHA extensions.

:class:`Signer` holds the server's private key and issues sequence numbers that keep growing
across restarts; :func:`open_signed` checks a frame against one public key. Keeping track of
sequences already seen, and key rotation, belong to the device (:mod:`edgefl.trust.pinning`).
"""
from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefl.durable import replace_file
from .errors import MessageMisbound, SignatureInvalid
from .keys import KEY_ID_BYTES, key_id

MAGIC = b"EFLS"
FORMAT_VERSION = 1
SIGNATURE_BYTES = 64
#: Message kinds and their codes on the wire.
KINDS = {"model": 1, "round": 2, "receipt": 3, "key": 4, "refresh": 5}
_KIND_NAMES = {code: name for name, code in KINDS.items()}
_HEADER = struct.Struct("<4sBBBBQQ8sI")
HEADER_BYTES = _HEADER.size  # 36
#: Fixed bytes of a frame around its fleet, subject and payload (header and signature).
OVERHEAD = HEADER_BYTES + SIGNATURE_BYTES
#: How far ahead of the last issued sequence a :class:`Signer` reserves on disk (microseconds).
SEQUENCE_LEASE_US = 3600 * 10**6


@dataclass(frozen=True)
class SignedMessage:
    """A frame whose signature was checked against a public key.

    ``payload`` is the inner message (model envelope, announcement JSON, ...), exactly as signed.
    """

    kind: str
    fleet: str
    subject: str
    sequence: int
    issued_at: float  # Unix time, seconds
    key_id: bytes
    payload: bytes


def _ascii(kind: str, value: str) -> bytes:
    data = value.encode("ascii")
    if len(data) > 64:
        raise ValueError(f"{kind} {value!r} is longer than 64 characters")
    return data


def frame_prefix(kind: str, fleet: str, subject: str, sequence: int, issued_us: int,
                 signer_key_id: bytes, payload_length: int) -> bytes:
    """The header, fleet and subject of a frame: what precedes its payload."""
    if kind not in KINDS:
        raise ValueError(f"unknown message kind {kind!r}: one of {sorted(KINDS)}")
    f, s = _ascii("fleet", fleet), _ascii("subject", subject)
    if not f:
        raise ValueError("a signed message needs a fleet")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, KINDS[kind], len(f), len(s), sequence, issued_us,
                          signer_key_id, payload_length)
    return header + f + s


def signed_input(prefix: bytes, payload) -> bytes:
    """What the signature covers: the frame's prefix, then SHA-256 of the payload."""
    return prefix + hashlib.sha256(payload).digest()


class Signer:
    """The server's signing key for one fleet, issuing sequence numbers that only grow.

    Parameters
    ----------
    private_key : Ed25519PrivateKey
    fleet : str
        Written into every frame; devices of another fleet refuse it.
    sequence_file : path, optional
        Where the signer reserves sequence numbers ahead (one small durable write per hour of
        signing, not one per message), so a restarted server, even with a clock set back,
        continues above every sequence it issued. Without it, sequences start at the current
        time in microseconds, which suffices only while the clock never goes back.

    Sequences are microseconds since the epoch where the clock allows, so they also say when a
    message was issued; ``issued_at`` is the plain clock reading.
    """

    def __init__(self, private_key: Ed25519PrivateKey, fleet: str, *, sequence_file=None):
        self._key = private_key
        self.fleet = fleet
        self.public_key: Ed25519PublicKey = private_key.public_key()
        self.key_id = key_id(self.public_key)
        self._lock = threading.Lock()
        self._path = Path(sequence_file) if sequence_file is not None else None
        self._reserved = 0
        if self._path is not None and self._path.exists():
            try:
                self._reserved = int(json.loads(self._path.read_text())["reserved"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"the signing sequence file {self._path} is unreadable ({exc}); "
                                 "restore it from a backup, or delete it only if this server's "
                                 "clock is known to be right") from None
        self._last = self._reserved

    def sign(self, kind: str, payload: bytes, *, subject: str = "") -> bytes:
        """A signed frame carrying ``payload`` as a message of ``kind`` (for device ``subject``)."""
        now_us = time.time_ns() // 1000
        with self._lock:
            sequence = max(self._last + 1, now_us)
            if self._path is not None and sequence >= self._reserved:
                self._reserve(sequence + SEQUENCE_LEASE_US)
            self._last = sequence
        prefix = frame_prefix(kind, self.fleet, subject, sequence, now_us, self.key_id,
                              len(payload))
        return b"".join((prefix, payload, self._key.sign(signed_input(prefix, payload))))

    def _reserve(self, reserved: int) -> None:
        replace_file(self._path, json.dumps({"reserved": reserved}).encode())
        self._reserved = reserved


def parse_signed(frame) -> tuple[SignedMessage, bytes, bytes]:
    """Split a frame into its fields, the signed input and the signature (nothing verified).

    Raises
    ------
    SignatureInvalid
        If ``frame`` is not a well-formed signed frame (for example an unsigned message).
    """
    data = bytes(frame)
    if len(data) < OVERHEAD or data[:4] != MAGIC:
        raise SignatureInvalid(
            f"not a signed message ({len(data)} bytes starting {data[:4]!r}, expected {MAGIC!r}): "
            "only messages signed by the fleet's server are accepted")
    magic, version, kind, flen, slen, sequence, issued_us, kid, plen = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SignatureInvalid(f"signed-message format version {version} is not supported (this "
                               f"edgefl reads {FORMAT_VERSION}); upgrade the older side")
    if kind not in _KIND_NAMES:
        raise SignatureInvalid(f"unknown signed message kind {kind}")
    if HEADER_BYTES + flen + slen + plen + SIGNATURE_BYTES != len(data):
        raise SignatureInvalid(f"signed message lengths do not add up: {HEADER_BYTES} + fleet "
                               f"{flen} + subject {slen} + payload {plen} + signature "
                               f"{SIGNATURE_BYTES} != {len(data)} bytes")
    pos = HEADER_BYTES
    try:
        fleet = data[pos:pos + flen].decode("ascii")
        subject = data[pos + flen:pos + flen + slen].decode("ascii")
    except UnicodeDecodeError:
        raise SignatureInvalid("the fleet or subject of a signed message is not ASCII") from None
    pos += flen + slen
    payload = data[pos:pos + plen]
    message = SignedMessage(_KIND_NAMES[kind], fleet, subject, sequence, issued_us / 1e6, kid,
                            payload)
    return message, signed_input(data[:pos], payload), data[-SIGNATURE_BYTES:]


def open_signed(frame, public_key: Ed25519PublicKey, *, fleet: str, kind: str,
                subject: str = "") -> SignedMessage:
    """Verify ``frame`` with ``public_key`` and check that it is a ``kind`` message for ``fleet``
    (and device ``subject``); return it.

    Raises
    ------
    SignatureInvalid
        Malformed, unsigned, signed by another key, or altered.
    MessageMisbound
        Validly signed but for another fleet, kind or device.
    """
    message, body, signature = parse_signed(frame)
    if message.key_id != key_id(public_key):
        raise SignatureInvalid(
            f"{message.kind} message signed by key {message.key_id.hex()}, but this device trusts "
            f"key {key_id(public_key).hex()}: it is not from this fleet's server (or the server's "
            "key changed without a rotation notice; re-provision the device)")
    try:
        public_key.verify(bytes(signature), bytes(body))
    except InvalidSignature:
        raise SignatureInvalid(f"{message.kind} message: the signature does not match its bytes "
                               "(forged or altered in transit)") from None
    if message.fleet != fleet:
        raise MessageMisbound(f"a {message.kind} message signed for fleet {message.fleet!r} "
                              f"arrived in fleet {fleet!r}")
    if message.kind != kind:
        raise MessageMisbound(f"a signed {message.kind} message arrived where a {kind} message "
                              "belongs")
    if message.subject != subject:
        raise MessageMisbound(f"a {kind} message signed for {message.subject or 'the fleet'!r} "
                              f"arrived for {subject or 'the fleet'!r}")
    return message
