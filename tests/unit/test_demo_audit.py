"""The demo's audit rests on what the framework records, whatever the handler.

A handler author who plugs in a handler that keeps no transcript (e.g. it only counts
messages) used to get `lost=<every message>` and exit 1 although every message was done:
the audit read the default handler's transcript. Now done-flags decide `processed`, the
DLQ index `dead_lettered`, and the transcript (when there is one) only the order.
"""

from __future__ import annotations

from qywx_ray.demo import audit_records

TRUTH = {"kf1": {"u1": ["a", "b", "c"], "u2": ["d", "e"]}}


def test_custom_handler_all_done_is_not_lost() -> None:
    result = audit_records(TRUTH, done={"a", "b", "c", "d", "e"}, dead=set())
    assert (result.messages, result.processed, result.lost) == (5, 5, 0)
    assert result.reordered_users is None
    assert result.duplicated is None
    assert result.ok
    assert "reordered=n/a" in result.line()


def test_missing_done_flag_is_lost_unless_dead_lettered() -> None:
    result = audit_records(TRUTH, done={"a", "c", "d"}, dead={"e"})
    assert (result.processed, result.dead_lettered, result.lost) == (3, 1, 1)
    assert result.lost_ids == ["b"]
    assert not result.ok


def test_transcript_checks_order_and_duplicates() -> None:
    done = {"a", "b", "c", "d", "e"}
    transcripts = {("kf1", "u1"): ["a", "c", "b"], ("kf1", "u2"): ["d", "e", "e"]}
    result = audit_records(TRUTH, done=done, dead=set(), transcripts=transcripts)
    assert result.reordered_users == 1
    assert result.duplicated == 1
    assert result.lost == 0
    assert not result.ok


def test_capped_transcript_is_not_a_reorder() -> None:
    done = {"a", "b", "c", "d", "e"}
    transcripts = {("kf1", "u1"): ["b", "c"], ("kf1", "u2"): ["e"]}
    result = audit_records(TRUTH, done=done, dead=set(), transcripts=transcripts)
    assert result.reordered_users == 0
    assert result.ok


def test_state_must_count_each_processed_message_once() -> None:
    done = {"a", "b", "c", "d"}  # e was dead-lettered: not applied
    good = {"u1": {"messages": 3, "last_msgid": "c"}, "u2": {"messages": 1, "last_msgid": "d"}}
    result = audit_records(TRUTH, done=done, dead={"e"}, states=good)
    assert result.state_mismatch == 0
    assert result.ok
    assert "state_mismatch=0" in result.line()
    twice = {**good, "u1": {"messages": 4, "last_msgid": "c"}}  # one applied twice
    result = audit_records(TRUTH, done=done, dead={"e"}, states=twice)
    assert result.state_mismatch == 1
    assert result.state_mismatch_users == ["u1"]
    assert not result.ok
    foreign = {**good, "u2": {"messages": 1, "last_msgid": "e"}}  # a failed one applied
    assert audit_records(TRUTH, done=done, dead={"e"}, states=foreign).state_mismatch == 1
    missing = {"u1": good["u1"]}  # u2's state lost
    assert audit_records(TRUTH, done=done, dead={"e"}, states=missing).state_mismatch == 1
    assert audit_records(TRUTH, done=done, dead={"e"}).state_mismatch is None
