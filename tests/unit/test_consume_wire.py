"""Hot-path encodings of the consume side: batch wire forms, header routing, envelope parse.

Each fast path must give exactly what the slow, obvious code gives (they replaced it
for speed only)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qywx_ray.consume.handlers import (
    HandlerContext,
    envelope_handler,
    noop_handler,
    wants_typed_message,
)
from qywx_ray.consume.partition_consumer import _routing_headers
from qywx_ray.consume.types import (
    Delivery,
    pack_deliveries,
    pack_done,
    unpack_deliveries,
    unpack_done,
)
from qywx_ray.dlq.strategies import is_dlq_retry, retry_count_of
from qywx_ray.envelope import Envelope, header_value
from qywx_ray.errors import EnvelopeError
from qywx_ray.testing.handlers import recording_handler

deliveries = st.builds(
    Delivery,
    topic=st.sampled_from(["main", "other"]),
    partition=st.integers(-1, 11),
    offset=st.integers(-1, 2**40),
    timestamp_ms=st.integers(0, 2**42),
    key=st.text(max_size=8),
    value=st.binary(max_size=32),
    msg_id=st.text(max_size=8),
    consumer=st.sampled_from(["c-0#ab", "c-1#cd"]),
    retry_count=st.integers(0, 5),
    is_retry=st.booleans(),
)


@given(st.lists(deliveries, max_size=20))
def test_packed_deliveries_round_trip(batch: list[Delivery]) -> None:
    packed = pack_deliveries(batch)
    # only lists of plain values: Ray sends these through msgpack, not cloudpickle
    assert all(type(col) is list for col in packed)
    assert unpack_deliveries(packed) == batch


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 3), st.integers(0, 99))))
def test_packed_done_keeps_every_completion_and_per_partition_order(
    done: list[tuple[str, int, int]],
) -> None:
    back = list(unpack_done(pack_done(done)))
    assert sorted(back) == sorted(done)
    for tp in {(t, p) for t, p, _ in done}:
        assert [o for t, p, o in back if (t, p) == tp] == [o for t, p, o in done if (t, p) == tp]


headers = st.lists(
    st.tuples(
        st.sampled_from(["msg_id", "retry_from_dlq", "retry_count", "msg_type", "v", "qywx_drain"]),
        st.sampled_from([b"", b"m1", b"m2", b"true", b"false", b"3", b"x"]),
    ),
    max_size=7,
)


@given(st.one_of(st.none(), headers))
def test_routing_headers_equal_the_one_header_helpers(hs: list[tuple[str, bytes]] | None) -> None:
    assert _routing_headers(hs) == (
        header_value(hs, "msg_id") or "",
        retry_count_of(hs),
        is_dlq_retry(hs),
        is_dlq_retry(hs) and header_value(hs, "qywx_drain") is not None,
    )


def _env(**raw: Any) -> Envelope:
    return Envelope(
        message_id="m-1", open_kfid="kf", external_userid="u-1", msgtype="text", raw=raw
    )


def test_envelope_fast_parse_equals_what_was_written() -> None:
    env = _env(text={"content": "你好"}, n=3)
    assert Envelope.from_bytes(env.to_bytes()) == env


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (b'{"v":2,"message_id":"a","open_kfid":"k","external_userid":"u","msgtype":"t"}', "newer"),
        (b'{"v":1,"message_id":"","open_kfid":"k","external_userid":"u","msgtype":"t"}', "valid"),
        (b'{"v":1,', "not JSON"),
        (
            b'{"v":"1","message_id":"a","open_kfid":"k","external_userid":"u","msgtype":"t"}',
            "newer",
        ),
        (b"[1]", "not a JSON object"),
        (b"", "empty"),
    ],
)
def test_envelope_rejections_keep_their_precise_errors(value: bytes, error: str) -> None:
    with pytest.raises(EnvelopeError, match=error):
        Envelope.from_bytes(value)


def test_bundled_handlers_skip_the_typed_parse_user_handlers_get_it() -> None:
    async def user_handler(message: Any, ctx: HandlerContext) -> None:
        return None

    assert not wants_typed_message(noop_handler)
    assert not wants_typed_message(recording_handler)
    assert wants_typed_message(user_handler)
    assert not wants_typed_message(envelope_handler(user_handler))
    asyncio.run(user_handler(None, None))  # type: ignore[arg-type]
