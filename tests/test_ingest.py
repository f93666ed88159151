"""Ingestion rules, one message at a time, against a real store (no broker needed here).

Updates arrive sealed to the server's key, as devices send them; the malformed cases are
malformed updates inside valid seals, and bad seals are cases of their own.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from edgefl.wire.protocol import Topics
from edgefl.trust import seal
from edgefl.wire import Update, encode_update
from edgefl_server.influence import InfluenceBounds
from edgefl_server.ingest import ACCEPTED, DROPPED, DUPLICATE, REJECTED, UpdateIngestor
from edgefl_server.model_builder import build_mlp
from edgefl_server.rounds import OPEN, WAITING, RoundState
from edgefl_server.store import ServerStore

pytestmark = pytest.mark.backend

N = 66  # parameters of the (8, 4, 6) MLP built below
TOPICS = Topics("f1")
ROUND = RoundState(3, 2, OPEN, deadline=1e12, selected=("d1", "d2", "d3"))
SEALING_KEY = X25519PrivateKey.generate()


@pytest.fixture
def store(tmp_path):
    model = build_mlp((8, 4, 6), seed=0)
    assert model.manifest.num_params == N
    s = ServerStore(tmp_path, fleet="f1", strategy="fedavg")
    s.initialize(model.with_weights(model.weights, version=2, round_id=2), ROUND)
    yield s
    s.close()


@pytest.fixture
def ingestor(store):
    return UpdateIngestor(store, TOPICS, num_params=N, max_update_bytes=4096,
                          bounds=InfluenceBounds(max_samples=1000, max_update_norm=100.0),
                          sealing_key=SEALING_KEY)


def payload(client="d1", round_id=3, base=2, uid=11, samples=10, values=None, indices=None, n=N):
    if values is None:
        values = np.full(n if indices is None else len(indices), 0.5, np.float32)
    return encode_update(Update(client, round_id, base, uid, samples, n,
                                None if indices is None else np.asarray(indices, np.uint32),
                                np.asarray(values, np.float32)))


def sealed(data, client="d1", round_id=3, key=SEALING_KEY):
    return seal(data, key.public_key(), fleet=TOPICS.fleet, client_id=client, round_id=round_id)


def ingest(ingestor, data, client="d1", round_state=ROUND, round_id=None):
    """Ingest ``data`` sealed by ``client`` for the round the update names (or ``round_id``)."""
    if round_id is None:
        round_id = int.from_bytes(data[8:12], "little") if len(data) >= 12 else 3
    return ingestor.ingest(TOPICS.update(client), sealed(data, client, round_id), round_state,
                           now=1.0)


def test_accepted_then_duplicate_counted_once(ingestor, store):
    first = ingest(ingestor, payload())
    assert first.status == ACCEPTED and first.update.update_id == 11
    assert (first.receipt.status, first.receipt.round_id, first.receipt.update_id) == ("accepted", 3, 11)
    again = ingest(ingestor, payload())
    assert again.status == DUPLICATE and again.receipt == first.receipt and again.update is None
    assert [u.client_id for u in store.round_updates(3)] == ["d1"]


def test_second_different_update_in_a_round_is_a_conflict(ingestor, store):
    ingest(ingestor, payload(uid=11))
    out = ingest(ingestor, payload(uid=12))
    assert (out.status, out.code) == (REJECTED, "conflict")
    assert "update 11" in out.receipt.reason and out.receipt.update_id == 12
    assert len(store.round_updates(3)) == 1


def test_duplicate_of_a_counted_update_after_its_round_closed(ingestor, store):
    """A QoS 1 redelivery that arrives after aggregation still gets 'accepted', not 'late'."""
    ingest(ingestor, payload())
    model = store.load().model
    store.commit_round(closed_round=3, model=model, next_round=RoundState(4, 2, WAITING),
                       strategy_state={}, record={})
    out = ingest(ingestor, payload(), round_state=RoundState(4, 2, OPEN, selected=("d1",)))
    assert out.status == DUPLICATE and out.receipt.status == "accepted"


@pytest.mark.parametrize("kwargs,code,words", [
    (dict(round_id=2), "late", "round 2 closed"),
    (dict(round_id=1), "stale_round", "stale round 1: the current round is 3"),
    (dict(round_id=4), "unknown_round", "round 4 has not started"),
    (dict(client="d9"), "not_selected", "'d9' is not selected for round 3"),
    (dict(base=1), "wrong_model_version", "model version 1, but round 3 trains version 2"),
    (dict(samples=0), "no_samples", "0 training samples"),
])
def test_rejections_say_why(ingestor, store, kwargs, code, words):
    client = kwargs.get("client", "d1")
    out = ingest(ingestor, payload(**kwargs), client=client)
    assert (out.status, out.code, out.client_id) == (REJECTED, code, client)
    assert out.receipt.status == "rejected" and words in out.receipt.reason
    assert store.round_updates(3) == []


def test_round_not_open(ingestor):
    out = ingest(ingestor, payload(), round_state=RoundState(3, 2, WAITING, selected=("d1",)))
    assert (out.status, out.code) == (REJECTED, "round_not_open")
    assert "not open" in out.receipt.reason


def test_a_device_cannot_speak_for_another(ingestor, store):
    out = ingest(ingestor, payload(client="d2"), client="d1")
    assert (out.status, out.code, out.client_id) == (REJECTED, "client_mismatch", "d1")
    assert "claims client 'd2'" in out.receipt.reason
    assert store.round_updates(3) == []


def with_checksum(body: bytes) -> bytes:
    """Re-seal a tampered message so that only the tampering itself is wrong."""
    return body + hashlib.sha256(body).digest()[:8]


def test_malformed_payloads_are_dropped_without_a_receipt(ingestor, store):
    good = payload()
    nan = bytearray(good[:-8])
    nan[-4:] = np.array([np.nan], "<f4").tobytes()  # the last value
    # index N + 5 written for a model of N + 10 parameters, then the header's num_params
    # (bytes 28-31, docs/wire-format.md) set to N
    wide = bytearray(payload(indices=[1, N + 5], values=[1.0, 1.0], n=N + 10)[:-8])
    wide[28:32] = np.array([N], "<u4").tobytes()
    out_of_range = with_checksum(bytes(wide))
    cases = {
        "truncated": good[:-5],
        "bit flip": bytes([good[0] ^ 1]) + good[1:],
        "nan": with_checksum(bytes(nan)),
        "wrong dimensions": payload(n=N + 1),
        "indices out of range": out_of_range,
        "empty": b"",
    }
    for name, data in cases.items():
        out = ingest(ingestor, data)
        assert (out.status, out.code, out.receipt) == (DROPPED, "malformed", None), name
        assert out.reason.startswith("undecodable update:"), name
    assert store.round_updates(3) == []


@pytest.mark.parametrize("case,words", [
    ("unsealed", "must seal"), ("another key", "re-provision"),
    ("sealed by another device", "sealed for 'd2'"), ("another round", "sealed for round 4"),
    ("altered", "authentication"),
])
def test_bad_seals_are_dropped_without_a_receipt(ingestor, store, case, words):
    good = payload()
    data = {
        "unsealed": good,
        "another key": sealed(good, key=X25519PrivateKey.generate()),
        "sealed by another device": sealed(payload(client="d2"), client="d2"),
        "another round": sealed(good, round_id=4),
        "altered": sealed(good)[:-1] + bytes([sealed(good)[-1] ^ 1]),
    }[case]
    out = ingestor.ingest(TOPICS.update("d1"), data, ROUND, now=1.0)
    assert (out.status, out.code, out.receipt) == (DROPPED, "bad_seal", None)
    assert words in out.reason
    assert store.round_updates(3) == []


def test_an_accepted_update_is_stored_opened(ingestor, store):
    ingest(ingestor, payload())
    assert store.round_updates(3)[0].payload == payload()


def test_claimed_samples_are_capped_and_large_updates_clipped(ingestor):
    out = ingest(ingestor, payload(samples=1_000_000, values=np.full(N, 20.0, np.float32)))
    assert out.status == ACCEPTED and out.bounded == ("samples_capped", "norm_clipped")
    assert out.update.num_samples == 1000
    norm = float(np.linalg.norm(out.update.values.astype(np.float64)))
    assert 99.99 < norm <= 100.0
    np.testing.assert_allclose(out.update.values, 100.0 / np.sqrt(N), rtol=1e-5)
    assert ingest(ingestor, payload(client="d2")).bounded == ()


def test_oversized_and_foreign_topics_are_dropped(ingestor):
    out = ingestor.ingest(TOPICS.update("d1"), b"\0" * 4097, ROUND, now=1.0)
    assert (out.status, out.code) == (DROPPED, "oversized") and "4097 bytes" in out.reason
    out = ingestor.ingest("edgefl/other/clients/d1/update", payload(), ROUND, now=1.0)
    assert (out.status, out.code) == (DROPPED, "bad_topic")


def test_sparse_update_accepted(ingestor):
    out = ingest(ingestor, payload(indices=[0, 7, 65], values=[1.0, -2.0, 3.0]))
    assert out.status == ACCEPTED
    np.testing.assert_array_equal(out.update.indices, [0, 7, 65])


@pytest.mark.parametrize("kwargs,name", [(dict(max_update_norm=0.0), "max_update_norm"),
                                         (dict(max_update_norm=float("inf")), "max_update_norm"),
                                         (dict(max_samples=0), "max_samples")])
def test_bounds_must_be_positive(kwargs, name):
    with pytest.raises(ValueError, match=name):
        InfluenceBounds(**kwargs)


def test_a_batch_judges_like_one_by_one(ingestor, store):
    """Group commit: duplicates and conflicts inside one batch are caught before it is stored."""
    msgs = [(TOPICS.update("d1"), sealed(payload(uid=1))),
            (TOPICS.update("d1"), sealed(payload(uid=1))),
            (TOPICS.update("d1"), sealed(payload(uid=2))),
            (TOPICS.update("d2"), sealed(payload(client="d2"), client="d2")),
            (TOPICS.update("d3"), sealed(b"junk", client="d3"))]
    outcomes = ingestor.ingest_batch(msgs, ROUND, now=1.0)
    assert [(o.status, o.code) for o in outcomes] == [
        (ACCEPTED, ""), (DUPLICATE, ""), (REJECTED, "conflict"), (ACCEPTED, ""),
        (DROPPED, "malformed")]
    assert [(u.client_id, u.update_id) for u in store.round_updates(3)] == [("d1", 1), ("d2", 11)]


def test_workers_sharing_a_store_judge_against_the_stored_round_and_each_other(tmp_path, store):
    """Two ingestors on one state directory (two worker processes): what one accepted, the
    other sees as a duplicate or conflict; the round is read from the store, not remembered."""
    other_store = ServerStore(tmp_path, fleet="f1", strategy="fedavg")
    first = UpdateIngestor(store, TOPICS, num_params=N, max_update_bytes=4096)
    second = UpdateIngestor(other_store, TOPICS, num_params=N, max_update_bytes=4096)
    try:
        out, judged = first.ingest_batch_shared([(TOPICS.update("d1"), payload(uid=11)),
                                                 (TOPICS.update("d2"), payload("d2", uid=5)),
                                                 (TOPICS.update("d2"), b"garbage")], now=1.0)
        assert judged == ROUND
        assert [(o.status, o.code) for o in out] == [(ACCEPTED, ""), (ACCEPTED, ""),
                                                     (DROPPED, "malformed")]
        out, _ = second.ingest_batch_shared([(TOPICS.update("d1"), payload(uid=11)),
                                             (TOPICS.update("d2"), payload("d2", uid=6)),
                                             (TOPICS.update("d3"), payload("d3", uid=7))], now=2.0)
        assert [(o.status, o.code) for o in out] == [(DUPLICATE, ""), (REJECTED, "conflict"),
                                                     (ACCEPTED, "")]
        assert other_store.count_updates(3) == 3
        # the coordinator closes the round: a worker's next batch is judged against the next one
        model = store.load().model
        with store.closing_round(3) as closing:
            assert [u.client_id for u in closing.updates] == ["d1", "d2", "d3"]
            closing.commit(model=model, next_round=RoundState(4, 2, WAITING),
                           strategy_state={}, record={})
        out, judged = second.ingest_batch_shared([(TOPICS.update("d1"), payload(uid=11)),
                                                  (TOPICS.update("d1"), payload(uid=12))], now=3.0)
        assert judged.round_id == 4
        assert [(o.status, o.code) for o in out] == [(DUPLICATE, ""), (REJECTED, "conflict")]
        out, _ = second.ingest_batch_shared([(TOPICS.update("d4"), payload("d4", uid=1))], now=4.0)
        assert (out[0].status, out[0].code) == (REJECTED, "late")
        assert store.count_updates(3) == 0 and store.round_updates(3) == []
    finally:
        other_store.close()
