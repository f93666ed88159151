"""Sealed updates (edgefl.trust.sealing): layout, binding to fleet/device/round, tampering."""
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings, strategies as st

from edgefl.trust import Opener, SealError, Sealer, open_sealed, parse_sealed, seal
from edgefl.trust.keys import key_id, raw_public

pytestmark = pytest.mark.cpu  # run again on an emulated aarch64 CPU by make test-arm64

SERVER = bytes(range(32, 64))
EPHEMERAL = bytes(range(64, 96))
NONCE = bytes(range(96, 108))
# The first update vector of docs/wire-format.md (69 bytes).
UPDATE = bytes.fromhex(
    "45464c5501010103020000000100000007000000000000000a000000e8030000030000000000803f0400000006"
    "00000064657603 06b105003800b40040004cf82550fcdbe2".replace(" ", ""))
# docs/wire-format.md, Sealed update, test vector.
VECTOR = bytes.fromhex(
    "45464c580101040302000000a0289810032eb41779a631eede1bf9c98f12032cdeadd0e7a079398fc786b88cc846"
    "ec89af85a51a606162636465666768696a6b64656d6f646576181a84e421220139e69805d4993768ff53e90aabd3"
    "37e98510ea4f9161a6e324009cd5c9c99a92422c3aae71d76e02643f1209a5828e087d97abe33a8f7226d9ee6e26"
    "d62fba2805177fe0a470356c0bfd440a33bf")


def _server():
    return X25519PrivateKey.from_private_bytes(SERVER)


def test_the_documented_vector_is_what_the_code_produces_and_opens():
    server = _server()
    assert raw_public(server).hex() == \
        "358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254"
    assert key_id(server).hex() == "a0289810032eb417"
    sealer = Sealer(server.public_key(), ephemeral=X25519PrivateKey.from_private_bytes(EPHEMERAL))
    sealed = sealer.seal(UPDATE, fleet="demo", client_id="dev", round_id=2, nonce=NONCE)
    assert sealed == VECTOR
    header, plaintext = open_sealed(VECTOR, server, fleet="demo", client_id="dev")
    assert plaintext == UPDATE and header.round_id == 2


def test_the_vector_appears_in_the_spec():
    from pathlib import Path

    spec = (Path(__file__).parent.parent / "docs" / "wire-format.md").read_text()
    section = spec.split("## Sealed update", 1)[1].split("\n## ", 1)[0]
    hex_text = "".join(line.split("  ")[0].replace(" ", "") for line in
                       section.split("```")[1].strip().splitlines())
    assert bytes.fromhex(hex_text) == VECTOR


def test_every_seal_uses_a_fresh_ephemeral_key():
    a = seal(UPDATE, _server().public_key(), fleet="demo", client_id="dev", round_id=2)
    b = seal(UPDATE, _server().public_key(), fleet="demo", client_id="dev", round_id=2)
    assert parse_sealed(a)[0].ephemeral_public != parse_sealed(b)[0].ephemeral_public
    assert a[-len(UPDATE):] != b[-len(UPDATE):]


def test_a_sealer_keeps_its_ephemeral_key_with_fresh_nonces_and_an_opener_opens_all():
    sealer, opener = Sealer(_server().public_key()), Opener(_server())
    sealed = [sealer.seal(UPDATE, fleet="demo", client_id="dev", round_id=2) for _ in range(3)]
    headers = [parse_sealed(s)[0] for s in sealed]
    assert len({h.ephemeral_public for h in headers}) == 1
    assert len({h.nonce for h in headers}) == 3
    assert all(opener.open(s, fleet="demo", client_id="dev")[1] == UPDATE for s in sealed)


def test_ciphertext_does_not_contain_the_update():
    assert UPDATE[:16] not in VECTOR and UPDATE[-8:] not in VECTOR


def test_another_device_or_fleet_or_key_cannot_open_or_redirect_it():
    with pytest.raises(SealError, match="arrived from 'dev-2'"):
        open_sealed(VECTOR, _server(), fleet="demo", client_id="dev-2")
    with pytest.raises(SealError, match="fleet"):
        open_sealed(VECTOR, _server(), fleet="other", client_id="dev")
    with pytest.raises(SealError, match="re-provision"):
        open_sealed(VECTOR, X25519PrivateKey.generate(), fleet="demo", client_id="dev")


def test_changing_the_clear_round_fails_authentication():
    tampered = bytearray(VECTOR)
    tampered[8] = 9  # round id 2 -> 9
    with pytest.raises(SealError, match="authentication"):
        open_sealed(bytes(tampered), _server(), fleet="demo", client_id="dev")


def test_an_unsealed_update_is_refused_with_what_to_do():
    with pytest.raises(SealError, match="must seal"):
        open_sealed(UPDATE, _server(), fleet="demo", client_id="dev")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(VECTOR) - 1), st.integers(1, 255))
def test_any_flipped_byte_is_refused(position, flip):
    tampered = bytearray(VECTOR)
    tampered[position] ^= flip
    with pytest.raises(SealError):
        open_sealed(bytes(tampered), _server(), fleet="demo", client_id="dev")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_seal_errors(data):
    with pytest.raises(SealError):
        open_sealed(data, _server(), fleet="demo", client_id="dev")
