"""Who may steer a fleet: signed server messages, pinned keys, sealed updates.

Used by devices and by the server alike (it is part of the bottom layer):

* :mod:`edgefl.trust.signing`: the signed frame around every server message, :class:`Signer`;
* :mod:`edgefl.trust.pinning`: :class:`PinnedKeys`, what a device trusts and has acted on;
* :mod:`edgefl.trust.sealing`: updates sealed to the server's key, opened only by the server;
* :mod:`edgefl.trust.keys`: public keys and key ids;
* :mod:`edgefl.trust.errors`: :class:`TrustError` and its kinds.

The threat model these answer is ``docs/security.md``; the byte layouts are in
``docs/wire-format.md``. All primitives come from ``cryptography``.
"""
from .errors import (
    KeyFileError, MessageMisbound, ReplayedMessage, SealError, SignatureInvalid, TrustError,
)
from .keys import key_id, sealing_public_key, signing_public_key
from .pinning import PinnedKeys, key_notice, parse_key_notice
from .sealing import Opener, Sealer, open_sealed, parse_sealed, seal
from .signing import KINDS, SignedMessage, Signer, open_signed, parse_signed

__all__ = [
    "KINDS", "KeyFileError", "MessageMisbound", "Opener", "PinnedKeys", "ReplayedMessage",
    "SealError", "Sealer", "SignatureInvalid", "SignedMessage", "Signer", "TrustError", "key_id",
    "key_notice", "open_sealed", "open_signed", "parse_key_notice", "parse_sealed", "seal",
    "sealing_public_key", "signing_public_key",
]
