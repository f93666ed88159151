"""What can go wrong when a message's origin or secrecy is checked.

Every error is a :class:`TrustError` (a ``ValueError``, so the handlers that already refuse
malformed input refuse these too) whose message says what was wrong and what to do about it.
"""
from __future__ import annotations


class TrustError(ValueError):
    """A message or key that edgefl's trust checks refuse."""


class SignatureInvalid(TrustError):
    """Unsigned, malformed, signed by a key that is not pinned, or a signature that does not
    match the bytes: the message did not come from the fleet's server unaltered."""


class MessageMisbound(TrustError):
    """A validly signed message for another fleet, another kind of message or another device
    than the one it arrived for (a signature cannot be replayed in another context)."""


class ReplayedMessage(TrustError):
    """A validly signed message whose sequence number is not newer than one already acted on."""


class SealError(TrustError):
    """A sealed update that is malformed, sealed to another key, or fails authentication."""


class KeyFileError(TrustError):
    """A key file that is missing, malformed, or readable by other users."""
