"""What a device trusts: the server's pinned public keys and the newest message it acted on.

A device is provisioned with the server's Ed25519 signing key and X25519 sealing key (the device
bundle's ``trust.json``). :class:`PinnedKeys` accepts a server message only if it verifies with
the pinned signing key, belongs to this fleet, kind and device, and (except receipts, which
answer one update each) carries a sequence not below the last one the device acted on for that
kind, so a replayed older message, however validly signed, changes nothing. (The very message
acted on last may come again: a broker redelivers retained messages on every connection.) The newest sequences and the
keys are kept in the device's state directory and written only after a verified message was
acted on.

Key rotation: a ``key`` message signed with the current key names the next signing and sealing
keys; from then on only the new signing key is trusted. A key never changes any other way (a
device that must forget a compromised key is re-provisioned). A notice naming the keys pinned
already (a device provisioned after the rotation) changes nothing and is passed over.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from edgefl.durable import replace_file
from .errors import KeyFileError, ReplayedMessage, SignatureInvalid
from .keys import key_id, raw_public, sealing_public_key, signing_public_key
from .sealing import Sealer
from .signing import SignedMessage, open_signed, parse_signed

log = logging.getLogger(__name__)

#: Kinds whose sequence must grow: a receipt answers one update and may come again.
ORDERED_KINDS = ("model", "round", "key", "refresh")
_NOTICE_VERSION = 1


def key_notice(signing_key: Ed25519PublicKey, sealing_key: X25519PublicKey) -> bytes:
    """The payload of a ``key`` message: version 1, then the next raw signing and sealing keys."""
    return bytes([_NOTICE_VERSION]) + raw_public(signing_key) + raw_public(sealing_key)


def parse_key_notice(payload: bytes) -> tuple[Ed25519PublicKey, X25519PublicKey]:
    """The next (signing, sealing) public keys a ``key`` message announces."""
    if len(payload) != 65 or payload[0] != _NOTICE_VERSION:
        raise SignatureInvalid(f"a key rotation notice must be 65 bytes of version "
                               f"{_NOTICE_VERSION}, got {len(payload)} bytes")
    return signing_public_key(payload[1:33]), sealing_public_key(payload[33:65])


def load_trust_file(path) -> dict:
    """Read a device bundle's ``trust.json``: ``fleet``, ``signing_key``, ``sealing_key`` (hex).

    Raises
    ------
    KeyFileError
        If it is missing or lacks a field, naming what to do.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
        return {"fleet": str(obj["fleet"]), "signing_key": str(obj["signing_key"]),
                "sealing_key": str(obj["sealing_key"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeyFileError(f"the trust file {path} is unusable ({type(exc).__name__}: {exc}); "
                           "copy trust.json from the device bundle `edgefl fleet add-device` "
                           "wrote") from None


class PinnedKeys:
    """The server keys one device trusts, with the replay state of the messages it acted on.

    Parameters
    ----------
    fleet : str
    signing_key : Ed25519PublicKey
        The key the device was provisioned with.
    sealing_key : X25519PublicKey
        The server's key updates are sealed to.
    path : path, optional
        The device's trust state file (keys after rotations, newest sequences); read if it
        exists and was made for the same provisioned key, written after every accepted message.
    """

    def __init__(self, fleet: str, signing_key: Ed25519PublicKey, sealing_key: X25519PublicKey,
                 *, path=None):
        self.fleet = fleet
        self._provisioned = raw_public(signing_key).hex()
        self.signing_key, self.sealing_key = signing_key, sealing_key
        # The signing key the last rotation replaced: only the device's own saved copies of
        # messages, verified when they arrived, may still be signed with it.
        self.replaced_signing_key: Ed25519PublicKey | None = None
        self.sequences = {kind: 0 for kind in ORDERED_KINDS}
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self._load()
        self._sealer = Sealer(self.sealing_key)

    @classmethod
    def from_trust_file(cls, trust_file, *, fleet: str, path=None) -> "PinnedKeys":
        """Pinned keys from a device bundle's ``trust.json``, checked against ``fleet``."""
        obj = load_trust_file(trust_file)
        if obj["fleet"] != fleet:
            raise KeyFileError(f"the trust file {trust_file} is for fleet {obj['fleet']!r}, not "
                               f"{fleet!r}: use the bundle of this fleet")
        return cls(fleet, signing_public_key(obj["signing_key"]),
                   sealing_public_key(obj["sealing_key"]), path=path)

    def _load(self) -> None:
        try:
            obj = json.loads(self.path.read_text())
            provisioned = obj["provisioned"]
            signing, sealing = obj["signing_key"], obj["sealing_key"]
            sequences = {kind: int(obj["sequences"].get(kind, 0)) for kind in ORDERED_KINDS}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Starting from the provisioned key is safe (never less strict about origin); only
            # replay protection restarts, and the model version check still refuses old models.
            log.warning("trust state %s is unreadable (%s); starting from the provisioned key",
                        self.path, exc)
            return
        if provisioned != self._provisioned:
            log.warning("trust state %s belongs to another provisioned key: the device was "
                        "re-provisioned, starting from the new key", self.path)
            return
        self.signing_key = signing_public_key(signing)
        self.sealing_key = sealing_public_key(sealing)
        self.sequences = sequences
        replaced = obj.get("replaced_signing_key")
        self.replaced_signing_key = None if replaced is None else signing_public_key(replaced)

    @property
    def signing_key_id(self) -> str:
        return key_id(self.signing_key).hex()

    def verify(self, frame, kind: str, *, subject: str = "") -> SignedMessage:
        """Check a frame: pinned signature, this fleet, ``kind``, ``subject``, not older than the
        last message of its kind acted on.

        Nothing is recorded: call :meth:`accept` once the message was acted on.

        Raises
        ------
        SignatureInvalid, MessageMisbound, ReplayedMessage
        """
        message = open_signed(frame, self.signing_key, fleet=self.fleet, kind=kind,
                              subject=subject)
        if kind in ORDERED_KINDS:
            with self._lock:
                last = self.sequences[kind]
            if message.sequence < last:
                raise ReplayedMessage(f"{kind} message with sequence {message.sequence} is older "
                                      f"than {last}, the newest one acted on: a replay")
        return message

    def accept(self, message: SignedMessage) -> None:
        """Record that the device acted on ``message`` (persisted before this returns)."""
        if message.kind not in ORDERED_KINDS:
            return
        with self._lock:
            self.sequences[message.kind] = max(self.sequences[message.kind], message.sequence)
            self._save_locked()

    def rotate(self, frame) -> SignedMessage:
        """Verify a ``key`` message with the current key and pin the keys it announces.

        Raises
        ------
        SignatureInvalid, MessageMisbound, ReplayedMessage
        """
        seen, _, _ = parse_signed(frame)
        if seen.kind == "key" and seen.sequence == self.sequences["key"]:
            # The notice already acted on, delivered again (it is retained): it is signed with
            # the key it replaced, so it no longer verifies, and it changes nothing.
            return seen
        if seen.kind == "key" and self._announces_pinned(seen.payload):
            # A device provisioned after the rotation pins the new keys already: the notice,
            # signed with the key it replaced, changes nothing for it (and needs no check).
            return seen
        message = self.verify(frame, "key")
        signing, sealing = parse_key_notice(message.payload)
        with self._lock:
            old = key_id(self.signing_key).hex()
            self.replaced_signing_key = self.signing_key
            self.signing_key, self.sealing_key = signing, sealing
            self._sealer = Sealer(sealing)
            self.sequences["key"] = message.sequence
            self._save_locked()
        log.warning("the server rotated its keys: signing key %s replaces %s",
                    key_id(signing).hex(), old)
        return message

    def open_saved(self, frame, kind: str) -> SignedMessage:
        """Verify a message the device saved itself (its model): signed with the pinned key, or
        with the key the last rotation replaced (saved before the rotation). No replay check.

        Raises
        ------
        SignatureInvalid, MessageMisbound
        """
        try:
            return open_signed(frame, self.signing_key, fleet=self.fleet, kind=kind)
        except SignatureInvalid:
            if self.replaced_signing_key is None:
                raise
            return open_signed(frame, self.replaced_signing_key, fleet=self.fleet, kind=kind)

    def _announces_pinned(self, payload: bytes) -> bool:
        """Whether a notice's payload names exactly the keys pinned now."""
        try:
            signing, sealing = parse_key_notice(payload)
        except (SignatureInvalid, ValueError):
            return False
        return (raw_public(signing), raw_public(sealing)) == (raw_public(self.signing_key),
                                                              raw_public(self.sealing_key))

    def seal(self, update: bytes, *, client_id: str, round_id: int) -> bytes:
        """Seal an encoded update to the pinned sealing key (:class:`edgefl.trust.Sealer`)."""
        return self._sealer.seal(update, fleet=self.fleet, client_id=client_id, round_id=round_id)

    def _save_locked(self) -> None:
        if self.path is None:
            return
        replace_file(self.path, json.dumps({
            "v": 1, "fleet": self.fleet, "provisioned": self._provisioned,
            "signing_key": raw_public(self.signing_key).hex(),
            "sealing_key": raw_public(self.sealing_key).hex(), "sequences": self.sequences,
            "replaced_signing_key": None if self.replaced_signing_key is None
            else raw_public(self.replaced_signing_key).hex(),
        }, indent=1).encode())
