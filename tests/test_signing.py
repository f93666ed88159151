"""Signed server messages (edgefl.trust.signing): layout, binding, tampering, sequences."""
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings, strategies as st

from edgefl.trust import MessageMisbound, SignatureInvalid, Signer, open_signed, parse_signed
from edgefl.trust.keys import key_id, raw_public
from edgefl.trust.signing import SEQUENCE_LEASE_US, frame_prefix, signed_input

pytestmark = pytest.mark.cpu  # run again on an emulated aarch64 CPU by make test-arm64

SEED = bytes(range(32))
RECEIPT = b'{"v":1,"round_id":3,"update_id":17,"status":"accepted","reason":""}'
# docs/wire-format.md, Signed message, test vector.
VECTOR = bytes.fromhex(
    "45464c5301030403010000000000000000401e18240a060056475aa75463474c4300000064656d6f6465767b2276"
    "223a312c22726f756e645f6964223a332c227570646174655f6964223a31372c22737461747573223a2261636365"
    "70746564222c22726561736f6e223a22227d071f22e5380faddb99a7c3be5c6cd46c3df241f4e4efebfa8d9aac9a"
    "068bb0971318bc7e06848eb5d7d63db16e6a5b74167e2f11dfb7bfb1a2e3beb35c149306")


def _key():
    return Ed25519PrivateKey.from_private_bytes(SEED)


def test_the_documented_vector_is_what_the_code_produces_and_verifies():
    key = _key()
    assert raw_public(key).hex() == \
        "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
    assert key_id(key).hex() == "56475aa75463474c"
    prefix = frame_prefix("receipt", "demo", "dev", 1, 1_700_000_000_000_000, key_id(key),
                          len(RECEIPT))
    assert prefix + RECEIPT + key.sign(signed_input(prefix, RECEIPT)) == VECTOR
    message = open_signed(VECTOR, key.public_key(), fleet="demo", kind="receipt", subject="dev")
    assert (message.kind, message.fleet, message.subject, message.sequence) == \
        ("receipt", "demo", "dev", 1)
    assert message.issued_at == 1_700_000_000.0 and message.payload == RECEIPT


def test_the_vector_appears_in_the_spec():
    from pathlib import Path

    spec = (Path(__file__).parent.parent / "docs" / "wire-format.md").read_text()
    section = spec.split("## Signed message", 1)[1].split("\n## ", 1)[0]
    hex_text = "".join(line.split("  ")[0].replace(" ", "") for line in
                       section.split("```")[1].strip().splitlines())
    assert bytes.fromhex(hex_text) == VECTOR


def test_signer_frames_verify_and_sequences_grow():
    signer = Signer(_key(), "demo")
    frames = [signer.sign("round", b"{}") for _ in range(50)]
    seqs = [open_signed(f, signer.public_key, fleet="demo", kind="round").sequence for f in frames]
    assert seqs == sorted(set(seqs))


def test_a_restarted_signer_continues_above_everything_it_issued(tmp_path, monkeypatch):
    path = tmp_path / "sequence.json"
    first = Signer(_key(), "demo", sequence_file=path)
    last = parse_signed(first.sign("model", b"m"))[0].sequence
    assert json.loads(path.read_text())["reserved"] >= last + SEQUENCE_LEASE_US - 1
    # The clock goes back a day: the next server still signs above what the first one did.
    import time
    real = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real() - 86400 * 10**9)
    second = Signer(_key(), "demo", sequence_file=path)
    assert parse_signed(second.sign("model", b"m"))[0].sequence > last


@pytest.mark.parametrize("field,value,error", [
    ("fleet", "other", MessageMisbound), ("kind", "model", MessageMisbound),
    ("subject", "dev-2", MessageMisbound),
])
def test_a_signature_does_not_transfer_to_another_context(field, value, error):
    expect = dict(fleet="demo", kind="receipt", subject="dev")
    expect[field] = value
    with pytest.raises(error, match="arrived"):
        open_signed(VECTOR, _key().public_key(), **expect)


def test_unsigned_and_foreign_signed_messages_are_refused():
    with pytest.raises(SignatureInvalid, match="not a signed message"):
        open_signed(RECEIPT, _key().public_key(), fleet="demo", kind="receipt", subject="dev")
    other = Signer(Ed25519PrivateKey.generate(), "demo").sign("receipt", RECEIPT, subject="dev")
    with pytest.raises(SignatureInvalid, match="not from this fleet's server"):
        open_signed(other, _key().public_key(), fleet="demo", kind="receipt", subject="dev")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(VECTOR) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_refused(position, flip):
    tampered = bytearray(VECTOR)
    tampered[position] ^= flip
    with pytest.raises((SignatureInvalid, MessageMisbound)):
        open_signed(bytes(tampered), _key().public_key(), fleet="demo", kind="receipt",
                    subject="dev")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_a_trust_error(data):
    with pytest.raises(SignatureInvalid):
        open_signed(data, _key().public_key(), fleet="demo", kind="model")


def test_truncated_and_extended_frames_are_refused():
    for frame in (VECTOR[:-1], VECTOR + b"\0", VECTOR[:40]):
        with pytest.raises(SignatureInvalid):
            open_signed(frame, _key().public_key(), fleet="demo", kind="receipt", subject="dev")
