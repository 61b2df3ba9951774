"""Commit only what is finished, and everything before it."""

from workers.stream.offsets import DeliveryGuard, OffsetTracker

TP = ("t", 0)


def test_commit_waits_for_the_first_unfinished_offset():
    t = OffsetTracker()
    for o in (5, 6, 7, 8):
        t.add(TP, o)
    t.done(TP, 6)
    t.done(TP, 8)
    assert t.committable() == {}
    t.done(TP, 5)
    assert t.committable() == {TP: 7}
    t.mark_committed({TP: 7})
    assert t.committable() == {}
    t.done(TP, 7)
    assert t.committable() == {TP: 9}
    assert t.in_flight() == 0


def test_partitions_are_independent():
    t = OffsetTracker()
    t.add(("t", 0), 0)
    t.add(("t", 1), 10)
    t.done(("t", 1), 10)
    assert t.committable() == {("t", 1): 11}
    assert t.in_flight(("t", 0)) == 1


def test_a_late_completion_from_before_a_revocation_is_ignored():
    t = OffsetTracker()
    old = t.add(TP, 3)
    t.forget([TP])
    new = t.add(TP, 3)  # the partition came back and offset 3 is polled again
    t.done(TP, 3, old)
    assert t.committable() == {}
    t.done(TP, 3, new)
    assert t.committable() == {TP: 4}


def test_offsets_must_increase_within_a_partition():
    import pytest

    t = OffsetTracker()
    t.add(TP, 4)
    with pytest.raises(ValueError, match="polled after"):
        t.add(TP, 4)


def test_a_client_that_moves_back_by_itself_does_not_get_records_redone():
    g = DeliveryGuard()
    assert [o for o in (0, 1, 2, 3) if g.admit(TP, o)] == [0, 1, 2, 3]
    # the client re-validated its position and went back to 2: 2 and 3 are already ours
    assert [o for o in (2, 3, 4) if g.admit(TP, o)] == [4]
    assert g.admit(("t", 1), 2)  # other partitions are separate


def test_our_own_seek_and_a_new_assignment_restart_delivery():
    g = DeliveryGuard()
    for o in range(10):
        g.admit(TP, o)
    g.reset(TP, 4)  # recovery seeked back to the committed offset
    assert g.admit(TP, 4)
    assert not g.admit(TP, 3)
    g.forget([TP])  # revoked: whatever comes after a new assignment is new
    assert g.admit(TP, 0)
