"""store.client.pack_resp: the bytes redis-py's own (pure Python) packer would send, for
every kind of argument a caller passes; what it refuses, it refuses the same way."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis._parsers.encoders import Encoder
from redis.connection import PythonRespSerializer
from redis.exceptions import DataError

from qywx_ray.store.client import pack_resp

ENCODE = Encoder("utf-8", "strict", False).encode


def redis_pys(*args: Any) -> bytes:
    """redis-py's reference packer (what it uses without hiredis), joined."""
    return b"".join(bytes(p) for p in PythonRespSerializer(6000, ENCODE).pack(*args))


@pytest.mark.parametrize(
    "args",
    [
        ("GET", "k"),
        ("CONFIG GET", "maxmemory"),  # a first argument of two words: split
        (b"CLIENT SETNAME", b"x"),
        ("SET", "k", 1, "EX", 10),
        ("SET", "k", 1.5),
        ("SET", "k", "中文\r\n"),
        ("SET", b"k", memoryview(b"view")),
        ("SET", b"k", bytearray(b"array")),
        ("SET", "k", b""),
        ("EVALSHA", "a" * 40, 2, b"k1", "k2", b"x" * 10_000, -3),  # beyond the buffer cutoff
    ],
)
def test_packs_as_redis_py_does(args: tuple[Any, ...]) -> None:
    assert pack_resp(ENCODE, args) == redis_pys(*args)


arguments = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=50),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(st.text(min_size=1, max_size=20), st.lists(arguments, max_size=30))
def test_any_command_packs_as_redis_py_does(name: str, rest: list[Any]) -> None:
    args = (name, *rest)
    assert pack_resp(ENCODE, args) == redis_pys(*args)


@pytest.mark.parametrize("bad", [True, None, object()])
def test_refuses_what_redis_py_refuses(bad: Any) -> None:
    with pytest.raises(DataError):
        pack_resp(ENCODE, ("SET", "k", bad))
