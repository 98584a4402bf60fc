"""The simulator's core: all WeCom kf state and API semantics, synchronous and I/O-free.

WeComSimulatorState is what tests and benchmarks drive directly (gettoken, kf/sync_msg,
kf/send_msg(_on_event), injected faults). It never forgets a produced message: `truth`
lists every message per user in order, even after the 3-day retention pruned it from
sync_msg.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, Field

from qywx_ray.testing.wecomsim.crypto import sim_encrypt, sim_sign
from qywx_ray.wecom.errcodes import ErrCode
from qywx_ray.wecom.settings import WeComSettings

RETENTION_S = 3 * 24 * 3600
ACCESS_TOKEN_TTL_S = 7200
SYNC_TOKEN_TTL_S = 600
REPLY_WINDOW_S = 48 * 3600
MAX_REPLIES_IN_WINDOW = 5
MAX_LIMIT = 1000
MSGID_RE = re.compile(r"[0-9A-Za-z_-]{1,32}")

MESSAGE_TYPES = (
    "text",
    "image",
    "voice",
    "video",
    "file",
    "location",
    "link",
    "business_card",
    "miniprogram",
    "msgmenu",
    "channels_shop_product",
    "channels_shop_order",
    "merged_msg",
    "channels",
    "meeting",
    "schedule",
    "note",
    "event",
)


FAULT_KINDS = ("errcode", "latency", "timeout", "http_500", "drop", "duplicate", "empty_page")


def _encode(msg: dict[str, Any], plain: bool) -> bytes:
    """A message as WeCom's compact UTF-8 JSON: the bytes json.dumps(ensure_ascii=False,
    separators=(",", ":")) writes. `plain` (the message holds only what the simulator
    builds, plus strs and ints): by orjson, which writes the same bytes for those, copied
    into an exactly sized object. Anything else takes the stdlib's path: orjson spells
    some floats differently (1e-7 for 1e-07), writes NaN and Infinity as null and encodes
    values the stdlib refuses (enums, datetimes), and refuses ints beyond 64 bits.

    Why the copy: the simulator keeps every message for the retention window, so its
    heap only grows; kept as orjson returns them (a larger buffer shrunk in place) the
    messages fragment it and the cost per message climbed from 14 to ~50 µs within a
    million messages, the stdlib stayed at ~21, the copy stays at 11-16 (1.5 M-message
    runs). The simulator shares a load run's 2 cores with the pipeline it feeds."""
    if plain:
        with contextlib.suppress(TypeError):  # orjson.JSONEncodeError
            return memoryview(orjson.dumps(msg)).tobytes()
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode()


class FaultRule(BaseModel):
    """One injected fault. api: gettoken, kf/sync_msg, kf/send_msg, kf/send_msg_on_event,
    callback, or * for every API. Fires for the next `count` matching calls (None =
    unlimited) with `probability`."""

    api: str = "*"
    kind: str = "errcode"
    errcode: int = ErrCode.SYSTEM_BUSY
    count: int | None = 1
    probability: float = Field(default=1.0, ge=0.0, le=1.0)
    latency_s: float = 0.0


@dataclass
class _Message:
    seq: int
    send_time: int
    external_userid: str
    msgid: str
    data: bytes  # the JSON object, encoded once


@dataclass
class _KfLog:
    messages: list[_Message] = field(default_factory=list)
    next_seq: int = 0


@dataclass
class _ReplyWindow:
    last_customer_ts: float = -1.0
    sent_since: int = 0


@dataclass
class SimStats:
    messages: int = 0
    sync_calls: int = 0
    sync_messages_served: int = 0
    sends: int = 0
    send_rejected: int = 0
    gettoken_calls: int = 0
    callbacks_queued: int = 0
    callbacks_delivered: int = 0
    callback_attempts: int = 0
    callbacks_failed: int = 0
    callbacks_dropped: int = 0
    callbacks_duplicated: int = 0
    faults_fired: int = 0


class WeComSimulatorState:
    """All simulator state and API semantics, synchronous and I/O-free."""

    def __init__(
        self,
        *,
        corp_id: str,
        kf_secret: str,
        callback_token: str,
        encoding_aes_key: str,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        retention_s: int = RETENTION_S,
        access_token_ttl_s: int = ACCESS_TOKEN_TTL_S,
    ) -> None:
        self.corp_id = corp_id
        self.kf_secret = kf_secret
        self.callback_token = callback_token
        self.encoding_aes_key = encoding_aes_key
        self.clock = clock
        self.rng = rng or random.Random()
        self.retention_s = retention_s
        self.access_token_ttl_s = access_token_ttl_s
        self.access_tokens: dict[str, float] = {}  # token -> expiry
        self.sync_tokens: dict[str, tuple[str, float]] = {}  # token -> (open_kfid, expiry)
        self.logs: dict[str, _KfLog] = defaultdict(_KfLog)
        self.truth: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        self.replies: list[dict[str, Any]] = []
        self.reply_windows: dict[tuple[str, str], _ReplyWindow] = defaultdict(_ReplyWindow)
        self.event_codes: dict[str, float] = {}  # welcome_code/msg_code -> expiry
        self.faults: list[FaultRule] = []
        self.stats = SimStats()
        self.listeners: list[Callable[[str], None]] = []  # called with open_kfid after adds
        # Bumped by invalidate_cursors: cursors issued under an older epoch are rejected.
        self.cursor_epochs: dict[str, int] = defaultdict(int)

    @classmethod
    def from_settings(cls, settings: WeComSettings, **kw: Any) -> WeComSimulatorState:
        return cls(
            corp_id=settings.corp_id,
            kf_secret=settings.kf_secret.get_secret_value(),
            callback_token=settings.token.get_secret_value(),
            encoding_aes_key=settings.encoding_aes_key.get_secret_value(),
            **kw,
        )

    # ---------------------------------------------------------------- helpers
    def _rand_id(self, prefix: str = "", n: int = 32) -> str:
        return (prefix + f"{self.rng.getrandbits(160):040x}")[:n]

    @staticmethod
    def _err(errcode: int, errmsg: str) -> dict[str, Any]:
        return {"errcode": errcode, "errmsg": errmsg}

    def add_fault(self, rule: FaultRule) -> None:
        if rule.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {rule.kind!r}; use one of {FAULT_KINDS}")
        self.faults.append(rule)

    def clear_faults(self) -> None:
        self.faults.clear()

    def take_faults(self, api: str) -> list[FaultRule]:
        """The rules that fire for this call (counts decremented, spent rules removed)."""
        fired: list[FaultRule] = []
        for rule in list(self.faults):
            if rule.api not in ("*", api):
                continue
            if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                continue
            fired.append(rule)
            if rule.count is not None:
                rule.count -= 1
                if rule.count <= 0:
                    self.faults.remove(rule)
        self.stats.faults_fired += len(fired)
        return fired

    def check_access_token(self, token: str | None) -> dict[str, Any] | None:
        """None if valid, else the error response."""
        if not token:
            return self._err(ErrCode.MISSING_TOKEN, "access_token missing")
        if token not in self.access_tokens:
            return self._err(ErrCode.INVALID_TOKEN, "invalid access_token")
        if self.access_tokens[token] <= self.clock():
            return self._err(ErrCode.TOKEN_EXPIRED, "access_token expired")
        return None

    def expire_access_tokens(self) -> int:
        """Expire every issued token now (next call gets 42001)."""
        now = self.clock()
        for tok in self.access_tokens:
            self.access_tokens[tok] = now
        return len(self.access_tokens)

    def revoke_access_tokens(self) -> int:
        """Forget every token (next call gets 40014)."""
        n = len(self.access_tokens)
        self.access_tokens.clear()
        return n

    # ---------------------------------------------------------------- APIs
    def gettoken(self, corpid: str, corpsecret: str) -> dict[str, Any]:
        self.stats.gettoken_calls += 1
        if corpid != self.corp_id:
            return self._err(ErrCode.INVALID_CORPID, "invalid corpid")
        if corpsecret != self.kf_secret:
            return self._err(ErrCode.INVALID_SECRET, "invalid credential")
        token = self._rand_id("AT", 64) + self._rand_id("", 40)
        self.access_tokens[token] = self.clock() + self.access_token_ttl_s
        if len(self.access_tokens) > 1000:  # drop expired ones
            now = self.clock()
            self.access_tokens = {t: e for t, e in self.access_tokens.items() if e > now}
        return {
            "errcode": 0,
            "errmsg": "ok",
            "access_token": token,
            "expires_in": self.access_token_ttl_s,
        }

    def _cursor_tag(self, open_kfid: str) -> str:
        epoch = self.cursor_epochs[open_kfid]
        seed = open_kfid if not epoch else f"{open_kfid}#{epoch}"
        return hashlib.sha1(seed.encode()).hexdigest()[:6]

    def _encode_cursor(self, open_kfid: str, seq: int) -> str:
        tag = self._cursor_tag(open_kfid)
        return base64.urlsafe_b64encode(f"{tag}:{seq}".encode()).decode().rstrip("=")

    def invalidate_cursors(self, open_kfid: str) -> None:
        """From now on sync_msg rejects (ErrCode.INVALID_PARAM, "invalid cursor") every cursor
        issued so far for this open_kfid, as WeCom does with a cursor it no longer
        accepts; a pull without a cursor starts again at the oldest retained message."""
        self.cursor_epochs[open_kfid] += 1

    def _decode_cursor(self, open_kfid: str, cursor: str) -> int | None:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            tag, seq = raw.split(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if tag != self._cursor_tag(open_kfid) or not seq.isdigit():
            return None
        return int(seq)

    def _prune(self, log: _KfLog) -> None:
        cutoff = self.clock() - self.retention_s
        msgs = log.messages
        if msgs and msgs[0].send_time < cutoff:
            k = 0
            while k < len(msgs) and msgs[k].send_time < cutoff:
                k += 1
            del msgs[:k]

    def sync_msg_bytes(
        self, access_token: str | None, body: dict[str, Any], *, empty_page: bool = False
    ) -> bytes:
        """kf/sync_msg, answered as ready JSON bytes (pages are pre-encoded: fast).

        empty_page: answer has_more=1 with no messages (WeCom does this at times)."""
        err = self.check_access_token(access_token)
        if err is not None:
            return json.dumps(err).encode()
        self.stats.sync_calls += 1
        open_kfid = body.get("open_kfid")
        if not open_kfid or not isinstance(open_kfid, str):
            return json.dumps(self._err(ErrCode.INVALID_PARAM, "open_kfid required")).encode()
        limit = body.get("limit", MAX_LIMIT)
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            return json.dumps(self._err(ErrCode.INVALID_PARAM, "limit must be 1..1000")).encode()
        sync_token = body.get("token")
        if sync_token:
            entry = self.sync_tokens.get(sync_token)
            if entry is None or entry[0] != open_kfid or entry[1] <= self.clock():
                refused = self._err(ErrCode.INVALID_SYNC_TOKEN, "invalid msg token")
                return json.dumps(refused).encode()
        log = self.logs[open_kfid]
        self._prune(log)
        first_seq = log.messages[0].seq if log.messages else log.next_seq
        cursor = body.get("cursor") or ""
        if cursor:
            pos = self._decode_cursor(open_kfid, cursor)
            if pos is None:
                return json.dumps(self._err(ErrCode.INVALID_PARAM, "invalid cursor")).encode()
        else:
            pos = first_seq
        pos = max(pos, first_seq)
        if empty_page:
            page: list[_Message] = []
            has_more, next_seq = True, pos
        else:
            start = pos - first_seq
            page = log.messages[start : start + limit]
            next_seq = page[-1].seq + 1 if page else pos
            has_more = next_seq < log.next_seq
        self.stats.sync_messages_served += len(page)
        head = json.dumps(
            {
                "errcode": 0,
                "errmsg": "ok",
                "next_cursor": self._encode_cursor(open_kfid, next_seq),
                "has_more": 1 if has_more else 0,
            }
        ).encode()
        return head[:-1] + b', "msg_list": [' + b",".join(m.data for m in page) + b"]}"

    def sync_msg(
        self, access_token: str | None, body: dict[str, Any], *, empty_page: bool = False
    ) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(
            self.sync_msg_bytes(access_token, body, empty_page=empty_page)
        )
        return result

    def _check_msgid(self, body: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        msgid = body.get("msgid")
        if msgid is None:
            return self._rand_id("", 32), None
        if not isinstance(msgid, str) or not MSGID_RE.fullmatch(msgid):
            bad = "msgid must be <= 32 chars of [0-9a-zA-Z_-]"
            return None, self._err(ErrCode.INVALID_PARAM, bad)
        return msgid, None

    def send_msg(self, access_token: str | None, body: dict[str, Any]) -> dict[str, Any]:
        err = self.check_access_token(access_token)
        if err is not None:
            return err
        touser, open_kfid, msgtype = body.get("touser"), body.get("open_kfid"), body.get("msgtype")
        if not touser or not open_kfid or not msgtype or msgtype not in body:
            missing = "touser, open_kfid, msgtype and its content required"
            return self._err(ErrCode.INVALID_PARAM, missing)
        msgid, err = self._check_msgid(body)
        if err is not None:
            return err
        window = self.reply_windows[(open_kfid, touser)]
        now = self.clock()
        if window.last_customer_ts < 0 or now - window.last_customer_ts > REPLY_WINDOW_S:
            self.stats.send_rejected += 1
            return self._err(ErrCode.SEND_LIMIT, "no customer message within 48 hours")
        if window.sent_since >= MAX_REPLIES_IN_WINDOW:
            self.stats.send_rejected += 1
            return self._err(ErrCode.SEND_LIMIT, "at most 5 messages after a customer message")
        window.sent_since += 1
        self.stats.sends += 1
        self.replies.append(
            {
                "api": "send_msg",
                "msgid": msgid,
                "touser": touser,
                "open_kfid": open_kfid,
                "msgtype": msgtype,
                "content": body[msgtype],
                "ts": now,
            }
        )
        return {"errcode": 0, "errmsg": "ok", "msgid": msgid}

    def send_msg_on_event(self, access_token: str | None, body: dict[str, Any]) -> dict[str, Any]:
        err = self.check_access_token(access_token)
        if err is not None:
            return err
        code, msgtype = body.get("code"), body.get("msgtype")
        if not code or not msgtype or msgtype not in body:
            return self._err(ErrCode.INVALID_PARAM, "code, msgtype and its content required")
        expiry = self.event_codes.get(code)
        if expiry is None or expiry <= self.clock():
            return self._err(ErrCode.INVALID_PARAM, "invalid or expired code")
        msgid, err = self._check_msgid(body)
        if err is not None:
            return err
        del self.event_codes[code]  # one reply per code
        self.stats.sends += 1
        self.replies.append(
            {
                "api": "send_msg_on_event",
                "msgid": msgid,
                "code": code,
                "msgtype": msgtype,
                "content": body[msgtype],
                "ts": self.clock(),
            }
        )
        return {"errcode": 0, "errmsg": "ok", "msgid": msgid}

    # ------------------------------------------------------------ producing messages
    def _payload(self, msgtype: str, content: str) -> dict[str, Any]:
        # The media id is drawn for every type (a seeded run's stream of ids stays the
        # same); text, nearly every message of a load run, skips building the samples.
        mid = self._rand_id("MEDIA", 40)
        if msgtype == "text":
            return {"content": content}
        samples: dict[str, dict[str, Any]] = {
            "text": {"content": content},
            "image": {"media_id": mid},
            "voice": {"media_id": mid},
            "video": {"media_id": mid},
            "file": {"media_id": mid},
            "location": {"latitude": 23.1, "longitude": 113.3, "name": "塔", "address": content},
            "link": {"title": "标题", "desc": content, "url": "https://example.com", "pic_url": ""},
            "business_card": {"userid": "zhangsan"},
            "miniprogram": {
                "title": content,
                "appid": "wx0000000000000000",
                "pagepath": "pages/index",
                "thumb_media_id": mid,
            },
            "msgmenu": {"head_content": content, "list": [], "tail_content": ""},
            "channels_shop_product": {"product_id": "1", "title": content, "sales_price": "1"},
            "channels_shop_order": {"order_id": "1", "product_titles": content, "state": "paid"},
            "merged_msg": {
                "title": "聊天记录",
                "item": [
                    {"send_time": 1, "msgtype": "text", "sender_name": "a", "msg_content": content}
                ],
            },
            "channels": {"sub_type": 1, "nickname": "n", "title": content},
            "meeting": {"meetingid": mid},
            "schedule": {"scheduleid": mid},
            "note": {},
        }
        return samples.get(msgtype, {"content": content})

    def add_messages(
        self,
        open_kfid: str,
        external_userid: str,
        count: int = 1,
        msgtype: str = "text",
        size_bytes: int = 0,
        origin: int = 3,
        notify: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> list[str]:
        """Append `count` messages from one user (ground truth records them in order).

        `extra` fields are merged into each message (tests use them to steer a handler).
        """
        log = self.logs[open_kfid]
        truth = self.truth[open_kfid][external_userid]
        now = self.clock()
        send_time = int(now)
        ids: list[str] = []
        plain = not extra or all(type(v) in (str, int) for v in extra.values())
        for _ in range(count):
            msgid = self._rand_id("", 32)
            n = len(truth)
            msg: dict[str, Any] = {"msgid": msgid, "send_time": send_time, "msgtype": msgtype}
            if msgtype == "event":
                code = self._rand_id("WC", 32)
                self.event_codes[code] = now + 20
                msg["origin"] = 4
                msg["event"] = {
                    "event_type": "enter_session",
                    "open_kfid": open_kfid,
                    "external_userid": external_userid,
                    "scene": "sim",
                    "scene_param": str(n),
                    "welcome_code": code,
                }
            else:
                content = f"{external_userid}#{n}"
                if size_bytes > len(content) + 180:
                    content += " " + "x" * (size_bytes - len(content) - 181)
                msg.update(
                    open_kfid=open_kfid,
                    external_userid=external_userid,
                    origin=origin,
                )
                msg[msgtype] = self._payload(msgtype, content)
            if extra:
                msg.update(extra)
            log.messages.append(
                _Message(
                    log.next_seq,
                    send_time,
                    external_userid,
                    msgid,
                    _encode(msg, plain),
                )
            )
            log.next_seq += 1
            truth.append(msgid)
            ids.append(msgid)
        if origin == 3 and msgtype != "event" and count:
            window = self.reply_windows[(open_kfid, external_userid)]
            window.last_customer_ts, window.sent_since = now, 0
        self.stats.messages += count
        if notify and count:
            for listener in self.listeners:
                listener(open_kfid)
        return ids

    def issue_sync_token(self, open_kfid: str) -> str:
        token = self._rand_id("ENC", 40)
        now = self.clock()
        self.sync_tokens[token] = (open_kfid, now + SYNC_TOKEN_TTL_S)
        if len(self.sync_tokens) > 10_000:
            self.sync_tokens = {t: e for t, e in self.sync_tokens.items() if e[1] > now}
        return token

    def build_callback(self, open_kfid: str) -> tuple[dict[str, str], bytes]:
        """A real encrypted kf_msg_or_event callback → (query params, XML body)."""
        now = int(self.clock())
        inner = (
            f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName>"
            f"<CreateTime>{now}</CreateTime><MsgType><![CDATA[event]]></MsgType>"
            "<Event><![CDATA[kf_msg_or_event]]></Event>"
            f"<Token><![CDATA[{self.issue_sync_token(open_kfid)}]]></Token>"
            f"<OpenKfId><![CDATA[{open_kfid}]]></OpenKfId></xml>"
        )
        encrypt = sim_encrypt(
            self.encoding_aes_key, self.corp_id, inner, self.rng.getrandbits(128).to_bytes(16)
        )
        timestamp, nonce = str(now), str(self.rng.getrandbits(40))
        params = {
            "msg_signature": sim_sign(self.callback_token, timestamp, nonce, encrypt),
            "timestamp": timestamp,
            "nonce": nonce,
        }
        body = (
            f"<xml><ToUserName><![CDATA[{self.corp_id}]]></ToUserName>"
            f"<Encrypt><![CDATA[{encrypt}]]></Encrypt>"
            "<AgentID><![CDATA[]]></AgentID></xml>"
        ).encode()
        return params, body

    def build_url_check(self, echo: str) -> dict[str, str]:
        """Query params of WeCom's GET URL verification for plaintext `echo`."""
        encrypt = sim_encrypt(
            self.encoding_aes_key, self.corp_id, echo, self.rng.getrandbits(128).to_bytes(16)
        )
        timestamp, nonce = str(int(self.clock())), str(self.rng.getrandbits(40))
        return {
            "msg_signature": sim_sign(self.callback_token, timestamp, nonce, encrypt),
            "timestamp": timestamp,
            "nonce": nonce,
            "echostr": encrypt,
        }

    def truth_view(self) -> dict[str, Any]:
        return {
            "total": self.stats.messages,
            "messages": {k: dict(users) for k, users in self.truth.items()},
        }
