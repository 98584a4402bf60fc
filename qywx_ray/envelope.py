"""The record Kafka carries between ingest and consume.

Versioned (`v`): readers accept every version up to ENVELOPE_VERSION and reject newer
ones with a clear EnvelopeError, so a rolling upgrade never silently misreads a message.
The key is always the external_userid; the WeCom `msgid` is the message_id, stable
across re-pulls, which is what consumers deduplicate on. A WeCom message whose other
fields are malformed still gets an envelope (`ingest_envelope`), flagged in `invalid`
and the `invalid` header: ingest must never drop a message it can address.
"""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
from pydantic import BaseModel, Field, ValidationError

from qywx_ray.errors import EnvelopeError

ENVELOPE_VERSION = 1

Headers = list[tuple[str, bytes]]
_CURRENT_PREFIX = b'{"v":%d,' % ENVELOPE_VERSION


class Envelope(BaseModel):
    v: int = ENVELOPE_VERSION
    message_id: str = Field(min_length=1)
    open_kfid: str
    external_userid: str = Field(min_length=1)
    msgtype: str
    origin: int = 3
    send_time: int = 0  # WeCom send_time, seconds
    raw: dict[str, Any] = Field(default_factory=dict)  # the WeCom message exactly as pulled
    ingest_ts_ms: int = Field(default_factory=lambda: int(time.time() * 1000))
    # Why WeCom's message did not validate ("" when it did): the fields above then hold
    # defaults where WeCom's value was unusable, and `raw` holds the message as pulled.
    invalid: str = ""

    @classmethod
    def from_wecom(cls, msg: dict[str, Any], *, ingest_ts_ms: int | None = None) -> Envelope:
        """Build from one kf/sync_msg item; events carry their ids inside `event`."""
        raw_event = msg.get("event")
        event: dict[str, Any] = raw_event if isinstance(raw_event, dict) else {}
        external_userid = msg.get("external_userid") or event.get("external_userid") or ""
        open_kfid = msg.get("open_kfid") or event.get("open_kfid") or ""
        try:
            return cls(
                message_id=str(msg["msgid"]),
                open_kfid=open_kfid,
                external_userid=external_userid or f"~{open_kfid}",
                msgtype=str(msg.get("msgtype", "")),
                origin=int(msg.get("origin", 3)),
                send_time=int(msg.get("send_time", 0)),
                raw=msg,
                ingest_ts_ms=ingest_ts_ms or int(time.time() * 1000),
            )
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise EnvelopeError(f"WeCom message cannot be enveloped: {exc}") from exc

    @property
    def key(self) -> bytes:
        return self.external_userid.encode()

    def to_bytes(self) -> bytes:
        """The record value. orjson over the field dict (declaration order, so the same
        object model_dump_json writes): 2-3x less CPU than pydantic's serializer on the
        ingest hot path (bench/bench_syncer_path.py). Anything orjson refuses (an int
        beyond 64 bits, a non-JSON type a caller put in `raw`) takes pydantic's path."""
        try:
            return orjson.dumps(self.__dict__)
        except TypeError:  # orjson.JSONEncodeError is a TypeError
            return self.model_dump_json().encode()

    def headers(self) -> Headers:
        headers = [
            ("msg_type", self.msgtype.encode()),
            ("msg_id", self.message_id.encode()),
            ("open_kfid", self.open_kfid.encode()),
            ("timestamp", b"%d" % (self.ingest_ts_ms // 1000)),
            ("v", b"%d" % self.v),
        ]
        if self.invalid:
            headers.append(("invalid", b"1"))
        return headers

    @classmethod
    def from_bytes(cls, value: bytes | None) -> Envelope:
        if not value:
            raise EnvelopeError("empty record value")
        # Hot path (every consumed record): what to_bytes() writes starts with the literal
        # version, so one Rust parse+validate suffices. Anything else, and anything it
        # rejects, takes the slow path below, which gives the precise error.
        if value.startswith(_CURRENT_PREFIX):
            try:
                return cls.model_validate_json(value)
            except ValidationError:
                pass
        try:
            data = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnvelopeError(f"record value is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise EnvelopeError("record value is not a JSON object")
        version = data.get("v", 1)
        if not isinstance(version, int) or version > ENVELOPE_VERSION:
            raise EnvelopeError(
                f"envelope version {version!r} is newer than this reader ({ENVELOPE_VERSION})"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise EnvelopeError(f"record is not a valid envelope: {exc}") from exc


def wecom_msgid(msg: object) -> str:
    """The message's WeCom msgid as a string, or "" when it has none usable."""
    if not isinstance(msg, dict):
        return ""
    msgid = msg.get("msgid")
    if isinstance(msgid, bool) or not isinstance(msgid, str | int):
        return ""
    return str(msgid)


def ingest_envelope(msg: dict[str, Any], *, ingest_ts_ms: int | None = None) -> Envelope | None:
    """The envelope ingest sends for one kf/sync_msg item, or None when it has no msgid.

    A message with a msgid is never dropped: if a field is malformed (`"origin": null`,
    `"send_time": "1700000000.5"`, ...) it is enveloped anyway, flagged in `invalid`, with
    the model's defaults (origin 0: unknown sender) where WeCom's value was unusable and
    the message as pulled in `raw`, so consumers see it, in order, and decide. Without a
    msgid it can be neither deduplicated nor addressed; the caller logs it.
    """
    msgid = wecom_msgid(msg)
    if not msgid:
        return None
    ts_ms = ingest_ts_ms or int(time.time() * 1000)
    fast = _routed_envelope(msg, msgid, ts_ms)
    if fast is not None:
        return fast
    return validated_envelope(msg, msgid, ts_ms)


def validated_envelope(msg: dict[str, Any], msgid: str, ingest_ts_ms: int) -> Envelope:
    """ingest_envelope's pydantic path (the reference the fast path is tested against):
    from_wecom, or on a malformed field the flagged envelope described above."""
    try:
        return Envelope.from_wecom(msg, ingest_ts_ms=ingest_ts_ms)
    except EnvelopeError as exc:
        reason = str(exc)[:500]
    raw_event = msg.get("event")
    event: dict[str, Any] = raw_event if isinstance(raw_event, dict) else {}
    open_kfid = _text(msg.get("open_kfid")) or _text(event.get("open_kfid"))
    external_userid = _text(msg.get("external_userid")) or _text(event.get("external_userid"))
    return Envelope(
        message_id=msgid,
        open_kfid=open_kfid,
        external_userid=external_userid or f"~{open_kfid}",
        msgtype=_text(msg.get("msgtype")),
        origin=0,
        send_time=0,
        raw=msg,
        ingest_ts_ms=ingest_ts_ms or int(time.time() * 1000),
        invalid=reason,
    )


# What Envelope.from_wecom passes explicitly (v and invalid keep their defaults).
_FROM_WECOM_FIELDS = frozenset(
    [
        "message_id",
        "open_kfid",
        "external_userid",
        "msgtype",
        "origin",
        "send_time",
        "raw",
        "ingest_ts_ms",
    ]
)
_new_object = object.__new__
_set_attr = object.__setattr__


def _routed_envelope(msg: dict[str, Any], msgid: str, ingest_ts_ms: int) -> Envelope | None:
    """Envelope.from_wecom without pydantic's validation, or None to take that path.

    Ingest's hot path (one call per pulled message): only the fields we route and
    deduplicate on are checked, and only their well-formed shapes are accepted (ids
    and msgtype as str, origin and send_time as int, `event` a dict or absent) - for
    those, validation would change nothing, so the instance is assembled directly and
    equals what from_wecom returns (tests/unit/test_envelope_fast_path.py proves it on
    generated messages). Anything else returns None and gets the validated path, with
    its coercions and its `invalid` flag. `raw` is the pulled dict itself, not a copy:
    the handler parses it typed later.
    """
    raw_event = msg.get("event")
    if raw_event is None:
        event: dict[str, Any] = {}
    elif type(raw_event) is dict:
        event = raw_event
    else:
        return None
    external_userid = msg.get("external_userid") or event.get("external_userid") or ""
    open_kfid = msg.get("open_kfid") or event.get("open_kfid") or ""
    msgtype = msg.get("msgtype", "")
    origin = msg.get("origin", 3)
    send_time = msg.get("send_time", 0)
    if (
        type(external_userid) is not str
        or type(open_kfid) is not str
        or type(msgtype) is not str
        or type(origin) is not int
        or type(send_time) is not int
    ):
        return None
    env = _new_object(Envelope)
    _set_attr(
        env,
        "__dict__",
        {
            "v": ENVELOPE_VERSION,
            "message_id": msgid,
            "open_kfid": open_kfid,
            "external_userid": external_userid or f"~{open_kfid}",
            "msgtype": msgtype,
            "origin": origin,
            "send_time": send_time,
            "raw": msg,
            "ingest_ts_ms": ingest_ts_ms,
            "invalid": "",
        },
    )
    _set_attr(env, "__pydantic_fields_set__", set(_FROM_WECOM_FIELDS))
    _set_attr(env, "__pydantic_extra__", None)
    _set_attr(env, "__pydantic_private__", None)
    return env


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def header_value(headers: Headers | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
