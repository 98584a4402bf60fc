"""The ingest fast path (orjson page parse, envelope assembled without validation, orjson
record bytes) must be indistinguishable, for consumers, from the pydantic path it replaces:
on generated WeCom messages - well-formed and malformed - the envelope, its key, headers
and what Envelope.from_bytes reads back are equal."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qywx_ray.envelope import Envelope, ingest_envelope, validated_envelope, wecom_msgid
from qywx_ray.wecom.models import SyncMsgPage

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too: orjson refuses those, pydantic's path takes over
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
ids = st.text(min_size=0, max_size=12)
# Each routed field: usually well formed, sometimes absent, sometimes any JSON value.
MISSING = object()


def field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(good, good, good, st.just(MISSING), json_values)


events = st.fixed_dictionaries(
    {},
    optional={
        "event_type": st.text(max_size=8),
        "open_kfid": ids | json_values,
        "external_userid": ids | json_values,
    },
)


@st.composite
def wecom_messages(draw: st.DrawFn) -> dict[str, Any]:
    parts = {
        "msgid": field(st.text(min_size=1, max_size=32) | st.integers(0, 2**40)),
        "open_kfid": field(ids),
        "external_userid": field(ids),
        "msgtype": field(st.sampled_from(["text", "image", "event", "voice", ""])),
        "origin": field(st.sampled_from([3, 4, 5])),
        "send_time": field(st.integers(0, 2**33)),
        "event": field(events),
        "text": field(st.fixed_dictionaries({"content": st.text(max_size=64)})),
    }
    msg = {}
    for key, strategy in parts.items():
        value = draw(strategy)
        if value is not MISSING:
            msg[key] = value
    msg.update(draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2)))
    # What the syncer sees went through a JSON parser (keys are str, tuples are lists).
    return json.loads(json.dumps(msg))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wecom_messages(), st.integers(1, 2**42))
def test_fast_envelope_equals_pydantic_path(msg: dict[str, Any], ts_ms: int) -> None:
    fast = ingest_envelope(msg, ingest_ts_ms=ts_ms)
    msgid = wecom_msgid(msg)
    if not msgid:
        assert fast is None
        return
    assert fast is not None
    slow = validated_envelope(msg, msgid, ts_ms)
    assert fast == slow
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.key == slow.key
    assert fast.headers() == slow.headers()
    wire = fast.to_bytes()
    assert Envelope.from_bytes(wire) == Envelope.from_bytes(slow.model_dump_json().encode())
    assert json.loads(wire) == json.loads(slow.model_dump_json())


def test_well_formed_message_takes_the_fast_path_and_keeps_raw() -> None:
    msg = {
        "msgid": "m1",
        "open_kfid": "wk1",
        "external_userid": "wm1",
        "msgtype": "text",
        "origin": 3,
        "send_time": 1700000000,
        "text": {"content": '你好 \u2028 "quoted"'},
    }
    env = ingest_envelope(msg, ingest_ts_ms=1700000000123)
    assert env is not None
    assert env.raw is msg  # not copied: the handler parses it typed later
    assert env.to_bytes() == env.model_dump_json().encode()  # same bytes, not only same data
    assert env.to_bytes().startswith(b'{"v":1,')  # from_bytes' one-parse hot path


def test_malformed_origin_is_still_flagged_invalid() -> None:
    env = ingest_envelope({"msgid": "m2", "external_userid": "wm", "origin": None})
    assert env is not None
    assert env.invalid
    assert env.origin == 0


def test_big_int_in_raw_falls_back_to_pydantic_bytes() -> None:
    env = ingest_envelope({"msgid": "m3", "external_userid": "wm", "n": 2**70})
    assert env is not None
    assert Envelope.from_bytes(env.to_bytes()).raw["n"] == 2**70


@settings(max_examples=100, deadline=None)
@given(
    st.lists(wecom_messages(), max_size=5) | json_values,
    st.booleans(),
    st.text(max_size=5),
)
def test_sync_page_from_response_equals_model_validate(
    msg_list: Any, has_more: bool, cursor: str
) -> None:
    data = {"errcode": 0, "errmsg": "ok", "next_cursor": cursor, "has_more": has_more}
    data["msg_list"] = msg_list
    try:
        expected = SyncMsgPage.model_validate(data)
    except ValueError:
        try:
            SyncMsgPage.from_response(data)
        except ValueError:
            return
        raise AssertionError("from_response accepted a page model_validate rejects") from None
    assert SyncMsgPage.from_response(data) == expected


def test_orjson_reads_pages_like_json() -> None:
    body = json.dumps({"msg_list": [{"msgid": "1", "text": {"content": "é"}}]}).encode()
    assert orjson.loads(body) == json.loads(body)
