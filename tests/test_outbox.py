"""edgefl.device.outbox: durable, bounded storage of updates until their receipts arrive."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.device.outbox import Outbox
from edgefl.wire.protocol import RoundAnnouncement


def test_put_read_remove(tmp_path):
    box = Outbox(tmp_path / "outbox")
    entry = box.put(3, 17, b"update-bytes", base_version=2)
    assert (entry.round_id, entry.update_id, entry.base_version, entry.size) == (3, 17, 2, 12)
    assert box.read(entry) == b"update-bytes"
    assert len(box) == 1 and box.total_bytes == 12
    assert box.remove(3, 17) is True
    assert box.remove(3, 17) is False  # a duplicate receipt is harmless
    assert len(box) == 0
    assert list((tmp_path / "outbox").iterdir()) == []


def test_entries_survive_reopening_in_round_order(tmp_path):
    box = Outbox(tmp_path)
    box.put(5, 2**64 - 1, b"b", base_version=10**10 - 1)
    box.put(4, 9, b"a", base_version=3)
    reopened = Outbox(tmp_path)
    assert [(e.round_id, e.update_id, e.base_version) for e in reopened.entries()] == [
        (4, 9, 3), (5, 2**64 - 1, 10**10 - 1)]
    assert [reopened.read(e) for e in reopened.entries()] == [b"a", b"b"]


def test_an_update_survives_sigkill_right_after_put(tmp_path):
    """Once put() returned, the update is on disk even if the process dies the next instant."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from edgefl.device.outbox import Outbox
        Outbox({str(tmp_path)!r}).put(7, 42, b"x" * 100000, base_version=0)
        sys.stdout.write("stored\\n"); sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL
    assert result.stdout == "stored\n"
    box = Outbox(tmp_path)
    [entry] = box.entries()
    assert (entry.round_id, entry.update_id) == (7, 42)
    assert box.read(entry) == b"x" * 100000


def test_a_half_written_temporary_file_is_discarded_on_open(tmp_path):
    Outbox(tmp_path).put(1, 1, b"complete", base_version=0)
    (tmp_path / "0000000002-00000000000000000001.update.tmp").write_bytes(b"trunc")
    box = Outbox(tmp_path)
    assert [(e.round_id, e.update_id) for e in box.entries()] == [(1, 1)]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_foreign_files_are_ignored_with_a_warning(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("hello")
    box = Outbox(tmp_path)
    assert len(box) == 0
    assert "notes.txt" in caplog.text
    assert (tmp_path / "notes.txt").exists()  # never delete what is not ours


def test_a_synchronous_round_drops_the_updates_of_earlier_rounds_with_a_log_line(tmp_path,
                                                                                 caplog):
    box = Outbox(tmp_path)
    box.put(1, 10, b"a", base_version=1)
    box.put(2, 11, b"b", base_version=2)
    box.put(3, 12, b"c", base_version=3)
    caplog.set_level("INFO", logger="edgefl.device.outbox")
    dropped = box.expire(RoundAnnouncement(3, 3, 0.0, selected=("dev-1",)))
    assert [(e.round_id, e.update_id) for e in dropped] == [(1, 10), (2, 11)]
    assert [(e.round_id, e.update_id) for e in box.entries()] == [(3, 12)]
    assert "update 10 of round 1" in caplog.text and "moved on to round 3" in caplog.text
    assert len(list(tmp_path.iterdir())) == 1


def test_a_buffered_round_keeps_updates_of_earlier_rounds_until_they_are_too_stale(tmp_path,
                                                                                  caplog):
    """FedBuff's bound, S = 2: an update counts while its base is at most 2 versions behind."""
    box = Outbox(tmp_path)
    box.put(1, 10, b"a", base_version=0)
    box.put(2, 11, b"b", base_version=1)
    box.put(4, 12, b"c", base_version=3)
    caplog.set_level("INFO", logger="edgefl.device.outbox")
    assert box.expire(RoundAnnouncement(5, 2, 0.0, max_staleness=2)) == []
    dropped = box.expire(RoundAnnouncement(6, 3, 0.0, max_staleness=2))
    assert [(e.round_id, e.update_id) for e in dropped] == [(1, 10)]
    assert [(e.round_id, e.update_id) for e in box.entries()] == [(2, 11), (4, 12)]
    assert ("dropped update 10 of round 1 without a receipt: it was trained on model version 0, "
            "3 versions behind the announced 3, and the server accepts at most 2") in caplog.text
    assert [(e.round_id, e.update_id) for e in Outbox(tmp_path).entries()] == [(2, 11), (4, 12)]
    # the fleet back to synchronous rounds: the usual rule again
    assert len(box.expire(RoundAnnouncement(7, 3, 0.0))) == 2


def test_an_entry_of_an_earlier_version_of_the_outbox_is_left_to_the_server(tmp_path):
    """Written without its base version: a buffered round cannot judge it, the receipt will."""
    (tmp_path / "0000000001-00000000000000000007.update").write_bytes(b"old")
    box = Outbox(tmp_path)
    [entry] = box.entries()
    assert (entry.round_id, entry.update_id, entry.base_version) == (1, 7, None)
    assert box.read(entry) == b"old"
    assert box.expire(RoundAnnouncement(9, 9, 0.0, max_staleness=0)) == []
    assert box.remove(1, 7) and not any(tmp_path.iterdir())
    (tmp_path / "0000000001-00000000000000000007.update").write_bytes(b"old")
    assert len(Outbox(tmp_path).expire(RoundAnnouncement(2, 2, 0.0))) == 1


def test_full_outbox_drops_the_oldest_and_keeps_the_newest(tmp_path, caplog):
    box = Outbox(tmp_path, max_entries=2)
    box.put(1, 1, b"a", base_version=0)
    box.put(2, 2, b"b", base_version=0)
    box.put(3, 3, b"c", base_version=0)
    assert [(e.round_id, e.update_id) for e in box.entries()] == [(2, 2), (3, 3)]
    assert "dropped update 1 of round 1" in caplog.text


def test_byte_bound(tmp_path):
    box = Outbox(tmp_path, max_bytes=10)
    box.put(1, 1, b"123456", base_version=0)
    box.put(2, 2, b"123456", base_version=0)
    assert [(e.round_id, e.update_id) for e in box.entries()] == [(2, 2)]
    with pytest.raises(ValueError, match="11 bytes exceeds the outbox bound of 10 bytes"):
        box.put(3, 3, b"x" * 11, base_version=0)
    assert [(e.round_id, e.update_id) for e in box.entries()] == [(2, 2)]  # nothing lost


@pytest.mark.parametrize("round_id, update_id, base", [(-1, 0, 0), (10**10, 0, 0), (0, 2**64, 0),
                                                       (0, -1, 0), (0, 0, -1), (0, 0, 10**10)])
def test_rejects_ids_out_of_range(tmp_path, round_id, update_id, base):
    with pytest.raises(ValueError, match="out of range"):
        Outbox(tmp_path).put(round_id, update_id, b"", base_version=base)


def test_rejects_non_positive_bounds(tmp_path):
    with pytest.raises(ValueError, match="max_entries=0"):
        Outbox(tmp_path, max_entries=0)


ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "remove", "synchronous", "buffered"]),
        st.integers(0, 6),
        st.integers(0, 4),
        st.integers(0, 4),
        st.binary(max_size=40),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops)
def test_matches_a_model_and_stays_within_bounds(tmp_path_factory, ops):
    """``number`` is the announced version of a buffered round and ``other`` its bound."""
    directory = tmp_path_factory.mktemp("box")
    box = Outbox(directory, max_entries=3, max_bytes=60)
    model: dict = {}  # (round, update id) -> (base version, payload)
    for op, number, update_id, other, payload in ops:
        if op == "put":
            box.put(number, update_id, payload, base_version=other)
            model[(number, update_id)] = (other, payload)
            while len(model) > 3 or sum(len(p) for _, p in model.values()) > 60:
                oldest = min(k for k in model if k != (number, update_id))
                del model[oldest]
        elif op == "remove":
            assert box.remove(number, update_id) == ((number, update_id) in model)
            model.pop((number, update_id), None)
        elif op == "synchronous":
            box.expire(RoundAnnouncement(number, 0, 0.0))
            model = {k: v for k, v in model.items() if k[0] >= number}
        else:
            box.expire(RoundAnnouncement(7, number, 0.0, max_staleness=other))
            model = {k: v for k, v in model.items() if number - v[0] <= other}
        assert len(box) <= 3 and box.total_bytes <= 60
    reopened = Outbox(directory, max_entries=3, max_bytes=60)
    assert {(e.round_id, e.update_id): (e.base_version, reopened.read(e))
            for e in reopened.entries()} == model
    assert len(os.listdir(directory)) == len(model)
