"""The JSON control messages and topic names of the MQTT protocol."""
import json

import pytest
from hypothesis import given, strategies as st

from edgefl.wire.protocol import (
    CompressionConfig,
    DeviceStatus,
    PrivacyConfig,
    ProtocolError,
    Receipt,
    RoundAnnouncement,
    Topics,
    TrainingConfig,
    check_name,
)

names = st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=64)


@given(
    round_id=st.integers(0, 2**32 - 1),
    version=st.integers(0, 2**32 - 1),
    deadline=st.floats(0, 4e9),
    selected=st.none() | st.lists(names, max_size=5).map(tuple),
    seed=st.integers(0, 2**64 - 1),
    state=st.sampled_from(["open", "closed", "finished"]),
    mu=st.floats(0, 10),
    staleness=st.none() | st.integers(0, 2**32 - 1),
)
def test_round_announcement_round_trip(round_id, version, deadline, selected, seed, state, mu,
                                       staleness):
    config = TrainingConfig(
        epochs=2, mu=mu,
        privacy=PrivacyConfig("laplace", epsilon=0.5, clip=2.0),
        compression=CompressionConfig("topk", density=0.01, values="ternary"),
    )
    msg = RoundAnnouncement(round_id, version, deadline, config, selected, seed, state, staleness)
    assert RoundAnnouncement.from_json(msg.to_json()) == msg
    # only buffered rounds carry the bound: a synchronous one reads as it did before the field
    assert ("max_staleness" in json.loads(msg.to_json())) == (staleness is not None)


def test_selection_follows_state_and_list():
    msg = RoundAnnouncement(1, 1, 0.0, selected=("a", "b"))
    assert msg.is_selected("a") and not msg.is_selected("c")
    assert RoundAnnouncement(1, 1, 0.0, selected=None).is_selected("anyone")
    assert not RoundAnnouncement(1, 1, 0.0, state="finished").is_selected("a")


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"v": 2}, "protocol version 2"),
        ({"round_id": -1}, "'round_id'"),
        ({"round_id": True}, "'round_id'"),
        ({"model_version": 1.5}, "'model_version'"),
        ({"state": "paused"}, "unknown state"),
        ({"max_staleness": -1}, "'max_staleness'"),
        ({"max_staleness": 1.5}, "'max_staleness'"),
        ({"max_staleness": "4"}, "'max_staleness'"),
        ({"selected": "dev-1"}, "'selected'"),
        ({"selected": ["ok", "bad/id"]}, "client id 'bad/id'"),
        ({"config": {"epochs": 0}}, "'epochs'"),
        ({"config": {"lr": float("nan")}}, "'lr'"),
        ({"config": {"privacy": {"mechanism": "bad/name"}}}, "privacy mechanism 'bad/name'"),
        ({"config": {"compression": {"values": "int4"}}}, "unknown value encoding"),
        ({"config": {"compression": {"method": "topk", "density": 2}}}, "density"),
        ({"config": {"compression": {"method": "randomk", "density": 0}}}, "density"),
        ({"config": {"compression": {"density": "half"}}}, "density"),
        ({"config": {"compression": {"method": "threshold", "tau": -1}}}, "tau"),
        ({"config": {"compression": {"tau": float("inf")}}}, "tau"),
        ({"config": {"learning_rate": 0.1}}, "learning_rate"),
    ],
)
def test_bad_round_announcements_are_rejected_with_a_reason(patch, message):
    obj = json.loads(RoundAnnouncement(1, 1, 10.0).to_json())
    obj.update(patch)
    with pytest.raises(ProtocolError, match=message):
        RoundAnnouncement.from_json(json.dumps(obj).encode())


@pytest.mark.parametrize("payload", [b"", b"\xff\xfe", b"[1, 2]", b"null", b"{not json", b"[" * 100_000])
def test_non_objects_are_protocol_errors(payload):
    for cls in (RoundAnnouncement, Receipt, DeviceStatus):
        with pytest.raises(ProtocolError):
            cls.from_json(payload)


def test_receipt_and_status_round_trip():
    receipt = Receipt(4, 2**63 + 5, "rejected", "stale round 3: the current round is 4")
    assert Receipt.from_json(receipt.to_json()) == receipt
    status = DeviceStatus("online", {"backend": "cython", "num_samples": 120})
    assert DeviceStatus.from_json(status.to_json()) == status
    with pytest.raises(ProtocolError, match="unknown status"):
        Receipt.from_json(b'{"v":1,"round_id":1,"update_id":1,"status":"maybe"}')


def test_messages_never_carry_nan():
    with pytest.raises(ValueError):
        RoundAnnouncement(1, 1, float("nan")).to_json()


def test_topics():
    t = Topics("plant-7")
    assert t.model == "edgefl/plant-7/model"
    assert t.round == "edgefl/plant-7/round"
    assert t.update("dev-1") == "edgefl/plant-7/clients/dev-1/update"
    assert t.receipt("dev-1") == "edgefl/plant-7/clients/dev-1/receipt"
    assert t.status("dev-1") == "edgefl/plant-7/clients/dev-1/status"
    assert t.all_updates == "edgefl/plant-7/clients/+/update"
    assert t.shared_updates("agg") == "$share/agg/edgefl/plant-7/clients/+/update"
    assert t.client_of("edgefl/plant-7/clients/dev-1/update") == "dev-1"
    assert t.client_of("edgefl/other/clients/dev-1/update") is None
    assert t.client_of("edgefl/plant-7/clients/dev-1") is None


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a b", "x" * 65, "é"])
def test_ids_that_would_break_topics_are_refused(bad):
    with pytest.raises(ProtocolError, match="use 1-64 characters"):
        check_name("client id", bad)
    with pytest.raises(ProtocolError):
        Topics(bad)


def test_a_mechanism_unknown_to_this_version_parses_so_that_the_device_can_decline_it():
    obj = json.loads(RoundAnnouncement(1, 1, 10.0).to_json())
    obj["config"] = {"privacy": {"mechanism": "distributed-skellam"}}
    parsed = RoundAnnouncement.from_json(json.dumps(obj).encode())
    assert parsed.config.privacy.mechanism == "distributed-skellam"


def test_status_says_which_mechanisms_whether_available_and_what_was_declined():
    status = DeviceStatus("online", {"mechanisms": ["central-gaussian"], "available": False,
                                     "unavailable": "privacy budget spent",
                                     "declined": {"round_id": 4, "reason": "unsupported"}})
    parsed = DeviceStatus.from_json(status.to_json())
    assert parsed.mechanisms == ("central-gaussian",) and not parsed.available
    assert parsed.declined_round == 4
    assert DeviceStatus("online").available and "laplace" in DeviceStatus("online").mechanisms
    assert not DeviceStatus("offline").available
    for caps, message in (({"mechanisms": "laplace"}, "mechanisms"), ({"available": 1}, "available"),
                          ({"declined": {"round_id": 1}}, "declined")):
        with pytest.raises(ProtocolError, match=message):
            DeviceStatus.from_json(DeviceStatus("online", caps).to_json())
