"""A device's pinned keys (edgefl.trust.pinning): replay state, persistence, rotation."""
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgefl.trust import (KeyFileError, PinnedKeys, ReplayedMessage, SignatureInvalid, Signer,
                          key_notice, open_sealed)
from edgefl.trust.keys import raw_public


@pytest.fixture
def server():
    return Signer(Ed25519PrivateKey.generate(), "demo"), X25519PrivateKey.generate()


def _pinned(server, path=None):
    signer, sealing = server
    return PinnedKeys("demo", signer.public_key, sealing.public_key(), path=path)


def test_a_replayed_announcement_is_refused_once_a_newer_one_was_acted_on(server, tmp_path):
    signer, _ = server
    pinned = _pinned(server, tmp_path / "trust.json")
    old, new = signer.sign("round", b"old"), signer.sign("round", b"new")
    pinned.accept(pinned.verify(new, "round"))
    with pytest.raises(ReplayedMessage, match="replay"):
        pinned.verify(old, "round")
    assert pinned.verify(new, "round").payload == b"new"  # the same one again: a redelivery
    # ... also after a reboot: the state file keeps the sequence.
    with pytest.raises(ReplayedMessage):
        _pinned(server, tmp_path / "trust.json").verify(old, "round")


def test_verifying_alone_records_nothing(server):
    signer, _ = server
    pinned = _pinned(server)
    frame = signer.sign("model", b"m")
    pinned.verify(frame, "model")
    assert pinned.verify(frame, "model").payload == b"m"


def test_receipts_may_come_again(server):
    signer, _ = server
    pinned = _pinned(server)
    frame = signer.sign("receipt", b"r", subject="dev")
    pinned.accept(pinned.verify(frame, "receipt", subject="dev"))
    assert pinned.verify(frame, "receipt", subject="dev").payload == b"r"


def test_rotation_needs_the_current_key_and_then_only_the_new_key_counts(server, tmp_path):
    signer, sealing = server
    pinned = _pinned(server, tmp_path / "trust.json")
    new_signer = Signer(Ed25519PrivateKey.generate(), "demo")
    new_sealing = X25519PrivateKey.generate()
    notice = key_notice(new_signer.public_key, new_sealing.public_key())
    with pytest.raises(SignatureInvalid):  # announced by someone else: refused
        pinned.rotate(Signer(Ed25519PrivateKey.generate(), "demo").sign("key", notice))
    rotation = signer.sign("key", notice)
    pinned.rotate(rotation)
    pinned.rotate(rotation)  # retained: delivered again on the next connection, changes nothing
    assert pinned.verify(new_signer.sign("model", b"m"), "model").payload == b"m"
    with pytest.raises(SignatureInvalid):
        pinned.verify(signer.sign("model", b"m"), "model")
    # Updates now go to the new sealing key, and the rotation survives a reboot.
    sealed = _pinned(server, tmp_path / "trust.json").seal(b"u", client_id="d", round_id=1)
    assert open_sealed(sealed, new_sealing, fleet="demo", client_id="d")[1] == b"u"
    # The device's own copy of a model saved before the rotation still opens (after a reboot
    # too), though the network's copy of it no longer verifies.
    saved = signer.sign("model", b"saved")
    rebooted = _pinned(server, tmp_path / "trust.json")
    assert rebooted.open_saved(saved, "model").payload == b"saved"
    with pytest.raises(SignatureInvalid):
        rebooted.open_saved(Signer(Ed25519PrivateKey.generate(), "demo").sign("model", b"x"),
                            "model")


def test_a_device_provisioned_after_a_rotation_passes_over_its_notice(server):
    signer, _ = server
    new_signer = Signer(Ed25519PrivateKey.generate(), "demo")
    new_sealing = X25519PrivateKey.generate()
    notice = signer.sign("key", key_notice(new_signer.public_key, new_sealing.public_key()))
    fresh = _pinned((new_signer, new_sealing))  # its bundle names the new keys already
    fresh.rotate(notice)  # signed with a key it never pinned, and nothing to change: no error
    assert fresh.signing_key_id == _pinned((new_signer, new_sealing)).signing_key_id
    # A notice naming other keys, signed with the key it replaced, is still refused.
    other = key_notice(Ed25519PrivateKey.generate().public_key(),
                       X25519PrivateKey.generate().public_key())
    with pytest.raises(SignatureInvalid):
        fresh.rotate(signer.sign("key", other))


def test_a_reprovisioned_device_starts_from_its_new_key(server, tmp_path):
    path = tmp_path / "trust.json"
    pinned = _pinned(server, path)
    pinned.accept(pinned.verify(server[0].sign("round", b"x"), "round"))
    other = (Signer(Ed25519PrivateKey.generate(), "demo"), X25519PrivateKey.generate())
    fresh = _pinned(other, path)
    assert fresh.sequences["round"] == 0 and fresh.signing_key_id != pinned.signing_key_id


def test_trust_file_errors_name_the_fix(server, tmp_path):
    with pytest.raises(KeyFileError, match="add-device"):
        PinnedKeys.from_trust_file(tmp_path / "missing.json", fleet="demo")
    path = tmp_path / "trust.json"
    signer, sealing = server
    path.write_text(json.dumps({"fleet": "other", "signing_key": raw_public(signer.public_key).hex(),
                                "sealing_key": raw_public(sealing).hex()}))
    with pytest.raises(KeyFileError, match="fleet 'other'"):
        PinnedKeys.from_trust_file(path, fleet="demo")
