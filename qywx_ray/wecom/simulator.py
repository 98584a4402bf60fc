"""A faithful WeCom kf simulator: gettoken, kf/sync_msg, kf/send_msg(_on_event), callbacks.

The core, WeComSimulatorState, is a plain synchronous class (no I/O) that tests and
benchmarks drive directly; WeComSimulator adds the asyncio parts (callback pusher,
scripted customer population) and `make_app` the thin FastAPI layer, served in-process
(httpx.ASGITransport) or by uvicorn (`python -m qywx_ray.wecom.simulator --help`).

It encrypts callbacks with its OWN code path (never WeComCrypto), so crypto tests compare
two independent implementations. It never forgets a produced message: /sim/truth lists
every message per user in order, even after the 3-day retention pruned it from sync_msg.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import struct
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from qywx_ray.wecom.client import install_redaction
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


# ------------------------------------------------------------- independent crypto
def sim_sign(token: str, timestamp: str, nonce: str, encrypt: str) -> str:
    """WeCom's msg_signature, written independently of qywx_ray.wecom.crypto."""
    joined = "".join(sorted((token, timestamp, nonce, encrypt)))
    return hashlib.sha1(joined.encode("utf-8")).hexdigest()


def sim_encrypt(encoding_aes_key: str, receive_id: str, text: str, random16: bytes) -> str:
    key = base64.b64decode(encoding_aes_key + "=")
    msg = text.encode("utf-8")
    plain = b"".join((random16, len(msg).to_bytes(4, "big"), msg, receive_id.encode()))
    pad = 32 - (len(plain) % 32)
    plain += bytes((pad,)) * pad
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(enc.update(plain) + enc.finalize()).decode("ascii")


def sim_decrypt(encoding_aes_key: str, encrypt: str) -> tuple[str, str]:
    """→ (message, receive_id); raises ValueError on anything malformed."""
    key = base64.b64decode(encoding_aes_key + "=")
    dec = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
    plain = dec.update(base64.b64decode(encrypt)) + dec.finalize()
    pad = plain[-1]
    if not 1 <= pad <= 32:
        raise ValueError("bad padding")
    plain = plain[:-pad]
    (n,) = struct.unpack(">I", plain[16:20])
    return plain[20 : 20 + n].decode("utf-8"), plain[20 + n :].decode("utf-8")


# ------------------------------------------------------------------- faults
FAULT_KINDS = ("errcode", "latency", "timeout", "http_500", "drop", "duplicate", "empty_page")


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
        mid = self._rand_id("MEDIA", 40)
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
                    json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode(),
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


# ------------------------------------------------------------------ population
class PopulationConfig(BaseModel):
    open_kfids: list[str] = Field(default_factory=lambda: ["wkSIMKF000000000000000001"])
    users: int = 100
    rate_per_min: float = 2.0  # messages per user per minute
    mix: dict[str, float] = Field(
        default_factory=lambda: {"text": 0.85, "image": 0.1, "event": 0.05}
    )
    burst_probability: float = 0.0  # per message: chance it comes as a burst
    burst_size: int = 10
    attackers: int = 0
    attacker_rate_per_min: float = 600.0
    size_bytes: int = 0
    # Benchmarks: stamp each message with `sim_created_ms` (unix ms when the population
    # added it), so end-to-end latency can be measured from creation to the handler.
    stamp_created_ms: bool = False


class Population:
    """Scripted customers; `tick(dt_s)` adds the messages due in dt_s (pure, seedable)."""

    def __init__(self, state: WeComSimulatorState, config: PopulationConfig) -> None:
        self.state = state
        self.config = config
        self._types = list(config.mix)
        self._weights = [config.mix[t] for t in self._types]
        self._carry = 0.0
        self._attack_carry = 0.0

    def user(self, i: int) -> tuple[str, str]:
        kfids = self.config.open_kfids
        return kfids[i % len(kfids)], f"wmSIMUSER{i:08d}"

    def tick(self, dt_s: float) -> int:
        cfg, rng = self.config, self.state.rng
        self._carry += cfg.users * cfg.rate_per_min * dt_s / 60.0
        due, self._carry = int(self._carry), self._carry - int(self._carry)
        added = 0
        extra = {"sim_created_ms": int(self.state.clock() * 1000)} if cfg.stamp_created_ms else None
        for _ in range(due):
            kf, user = self.user(rng.randrange(max(1, cfg.users)))
            msgtype = rng.choices(self._types, self._weights)[0]
            count = cfg.burst_size if rng.random() < cfg.burst_probability else 1
            added += len(
                self.state.add_messages(kf, user, count, msgtype, cfg.size_bytes, extra=extra)
            )
        self._attack_carry += cfg.attackers * cfg.attacker_rate_per_min * dt_s / 60.0
        due, self._attack_carry = (
            int(self._attack_carry),
            self._attack_carry - int(self._attack_carry),
        )
        for _ in range(due):
            i = rng.randrange(cfg.attackers)
            kf = cfg.open_kfids[i % len(cfg.open_kfids)]
            added += len(self.state.add_messages(kf, f"wmSIMATTACK{i:06d}", 1, "text", extra=extra))
        return added


# ------------------------------------------------------------------ async runtime
class WeComSimulator:
    """Pushes callbacks like WeCom (3 tries, no 200 within timeout → retry) and runs the
    scripted population. Use `async with WeComSimulator(...)` or start()/stop()."""

    def __init__(
        self,
        state: WeComSimulatorState,
        *,
        callback_url: str | None = None,
        callback_transport: httpx.AsyncBaseTransport | None = None,
        callback_timeout_s: float = 5.0,
        callback_tries: int = 3,
        callback_workers: int = 4,
        population: PopulationConfig | None = None,
        tick_s: float = 0.2,
        hang_s: float = 30.0,
    ) -> None:
        self.state = state
        self.callback_url = callback_url
        self.callback_timeout_s = callback_timeout_s
        self.callback_tries = callback_tries
        self.hang_s = hang_s
        self.tick_s = tick_s
        self.population = Population(state, population) if population else None
        self._transport = callback_transport
        self._workers = callback_workers
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._pending: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None
        self.callback_log: deque[dict[str, Any]] = deque(maxlen=1000)
        self.population_paused = False  # customers stop chatting (e.g. before an audit)
        state.listeners.append(self._on_new)

    def _on_new(self, open_kfid: str) -> None:
        if self.callback_url is None or open_kfid in self._pending:
            return  # coalesce: one pending callback per open_kfid is enough to trigger a pull
        self._pending.add(open_kfid)
        self.state.stats.callbacks_queued += 1
        self._queue.put_nowait(open_kfid)

    async def start(self) -> WeComSimulator:
        self._http = httpx.AsyncClient(transport=self._transport)
        for _ in range(self._workers):
            self._tasks.append(asyncio.create_task(self._push_loop()))
        if self.population is not None:
            self._tasks.append(asyncio.create_task(self._population_loop()))
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> WeComSimulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def idle(self, timeout_s: float = 10.0) -> None:
        """Wait until every queued callback has been delivered or given up."""
        await asyncio.wait_for(self._queue.join(), timeout_s)

    async def _population_loop(self) -> None:
        assert self.population is not None
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            if not self.population_paused:
                self.population.tick(now - last)
            last = now

    async def _push_loop(self) -> None:
        while True:
            open_kfid = await self._queue.get()
            self._pending.discard(open_kfid)
            try:
                await self.push_callback(open_kfid)
            except Exception as exc:  # noqa: BLE001 - never let one bad push kill the worker
                self.callback_log.append({"open_kfid": open_kfid, "error": type(exc).__name__})
            finally:
                self._queue.task_done()

    async def push_callback(self, open_kfid: str) -> bool:
        """Send one callback (honouring drop/duplicate/latency faults); True if acked."""
        faults = self.state.take_faults("callback")
        if any(f.kind == "drop" for f in faults):
            self.state.stats.callbacks_dropped += 1
            self.callback_log.append({"open_kfid": open_kfid, "dropped": True})
            return False
        for f in faults:
            if f.kind == "latency" and f.latency_s > 0:
                await asyncio.sleep(f.latency_s)
        params, body = self.state.build_callback(open_kfid)
        ok = await self._deliver(open_kfid, params, body)
        if any(f.kind == "duplicate" for f in faults):
            self.state.stats.callbacks_duplicated += 1
            await self._deliver(open_kfid, params, body)
        return ok

    async def _deliver(self, open_kfid: str, params: dict[str, str], body: bytes) -> bool:
        assert self._http is not None
        assert self.callback_url is not None
        url = f"{self.callback_url}?{urlencode(params)}"
        for attempt in range(1, self.callback_tries + 1):
            self.state.stats.callback_attempts += 1
            status: int | str
            try:
                resp = await self._http.post(
                    url,
                    content=body,
                    headers={"content-type": "text/xml"},
                    timeout=self.callback_timeout_s,
                )
                status = resp.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            if status == 200:
                self.state.stats.callbacks_delivered += 1
                self.callback_log.append(
                    {"open_kfid": open_kfid, "attempts": attempt, "status": 200}
                )
                return True
        self.state.stats.callbacks_failed += 1
        self.callback_log.append(
            {"open_kfid": open_kfid, "attempts": self.callback_tries, "status": status}
        )
        return False


# ---------------------------------------------------------------------- HTTP layer
class InjectRequest(BaseModel):
    open_kfid: str
    external_userid: str
    count: int = Field(default=1, ge=1, le=100_000)
    msgtype: str = "text"
    size_bytes: int = Field(default=0, ge=0, le=1_000_000)
    origin: int = 3
    extra: dict[str, Any] = Field(default_factory=dict)


class PopulationRates(BaseModel):
    """A running population's new rates; a field left out keeps its value."""

    users: int | None = Field(default=None, ge=1)
    rate_per_min: float | None = Field(default=None, ge=0)
    attackers: int | None = Field(default=None, ge=0)
    attacker_rate_per_min: float | None = Field(default=None, ge=0)


def make_app(sim: WeComSimulator, *, manage_lifecycle: bool = False) -> FastAPI:  # noqa: C901 - the simulator's routes, nested: their branches count here
    """WeCom's paths under /cgi-bin plus /sim/* for tests; a thin layer over the state.

    The simulator may run with real secrets (it reads QYWX_WECOM__*), and uvicorn's access
    log prints every query string: redact corpsecret/access_token there as the client does.
    """
    install_redaction("uvicorn.access", "uvicorn.error")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if manage_lifecycle:
            await sim.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await sim.stop()

    app = FastAPI(title="WeCom kf simulator", lifespan=lifespan)
    state = sim.state

    async def apply_faults(api: str, kinds: set[str] | None = None) -> Response | None:
        for f in state.take_faults(api):
            if kinds is not None:
                kinds.add(f.kind)
            if f.kind == "latency":
                await asyncio.sleep(f.latency_s)
            elif f.kind == "timeout":
                await asyncio.sleep(sim.hang_s)
            elif f.kind == "http_500":
                return Response("simulated server error", status_code=500)
            elif f.kind == "errcode":
                return JSONResponse({"errcode": f.errcode, "errmsg": "simulated fault"})
        return None

    async def json_body(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    @app.get("/cgi-bin/gettoken")
    async def gettoken(corpid: str = "", corpsecret: str = "") -> Response:
        return await apply_faults("gettoken") or JSONResponse(state.gettoken(corpid, corpsecret))

    @app.post("/cgi-bin/kf/sync_msg")
    async def sync_msg(request: Request, access_token: str = "") -> Response:
        kinds: set[str] = set()
        fault = await apply_faults("kf/sync_msg", kinds)
        if fault is not None:
            return fault
        body = await json_body(request)
        data = state.sync_msg_bytes(access_token, body, empty_page="empty_page" in kinds)
        return Response(data, media_type="application/json")

    @app.post("/cgi-bin/kf/send_msg")
    async def send_msg(request: Request, access_token: str = "") -> Response:
        fault = await apply_faults("kf/send_msg")
        if fault is not None:
            return fault
        return JSONResponse(state.send_msg(access_token, await json_body(request)))

    @app.post("/cgi-bin/kf/send_msg_on_event")
    async def send_msg_on_event(request: Request, access_token: str = "") -> Response:
        fault = await apply_faults("kf/send_msg_on_event")
        if fault is not None:
            return fault
        return JSONResponse(state.send_msg_on_event(access_token, await json_body(request)))

    @app.post("/sim/messages")
    async def inject(req: InjectRequest) -> dict[str, Any]:
        ids = state.add_messages(
            req.open_kfid,
            req.external_userid,
            req.count,
            req.msgtype,
            req.size_bytes,
            req.origin,
            extra=req.extra,
        )
        return {"msgids": ids}

    @app.post("/sim/faults")
    async def add_fault(rule: FaultRule) -> Response:
        try:
            state.add_fault(rule)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"faults": [r.model_dump() for r in state.faults]})

    @app.delete("/sim/faults")
    async def clear_faults() -> dict[str, Any]:
        state.clear_faults()
        return {"faults": []}

    @app.post("/sim/tokens/expire")
    async def expire_tokens() -> dict[str, int]:
        return {"expired": state.expire_access_tokens()}

    @app.get("/sim/population/mark")
    async def population_mark() -> dict[str, int]:
        """Messages created so far and the simulator's clock, read together: population
        messages counted here carry sim_created_ms <= clock_ms, later ones >= it."""
        return {"messages": state.stats.messages, "clock_ms": int(state.clock() * 1000)}

    # Registered before /sim/population/{action}, which would otherwise match "rates".
    @app.post("/sim/population/rates")
    async def population_rates(rates: PopulationRates) -> Response:
        """Change the population's rates while it runs (stress benchmarks step the load)."""
        if sim.population is None:
            return JSONResponse({"error": "no population configured"}, status_code=400)
        cfg = sim.population.config
        update = {k: v for k, v in rates.model_dump().items() if v is not None}
        sim.population.config = cfg.model_copy(update=update)
        return JSONResponse(sim.population.config.model_dump())

    @app.post("/sim/population/{action}")
    async def population(action: str) -> Response:
        if action not in ("pause", "resume"):
            return JSONResponse({"error": "action is pause or resume"}, status_code=400)
        sim.population_paused = action == "pause"
        return JSONResponse({"paused": sim.population_paused})

    @app.get("/sim/truth")
    async def truth() -> dict[str, Any]:
        return state.truth_view()

    @app.get("/sim/replies")
    async def replies() -> list[dict[str, Any]]:
        return state.replies

    @app.get("/sim/stats")
    async def stats() -> dict[str, Any]:
        return {**asdict(state.stats), "callbacks": list(sim.callback_log)[-20:]}

    return app


def parse_rate(text: str) -> float:
    """'2/min', '30/h', '0.5/s' or a bare number (per minute) → messages per minute."""
    num, _, unit = text.partition("/")
    per = {"": 1.0, "min": 1.0, "m": 1.0, "s": 60.0, "sec": 60.0, "h": 1 / 60, "hour": 1 / 60}
    if unit not in per:
        raise argparse.ArgumentTypeError(f"rate unit must be s, min or h, got {unit!r}")
    return float(num) * per[unit]


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, _, weight = part.partition("=")
        mix[name.strip()] = float(weight or 1)
    return mix


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    defaults = WeComSettings()
    p = argparse.ArgumentParser(
        prog="python -m qywx_ray.wecom.simulator", description="Run the WeCom kf simulator."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--callback-url", default=None, help="where to push kf_msg_or_event")
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--rate", type=parse_rate, default=2.0, help="per user, e.g. 2/min")
    p.add_argument("--open-kfids", default="wkSIMKF000000000000000001", help="comma list")
    p.add_argument("--mix", type=parse_mix, default=None, help="text=0.8,image=0.1,event=0.1")
    p.add_argument("--burst-probability", type=float, default=0.0)
    p.add_argument("--burst-size", type=int, default=10)
    p.add_argument("--attackers", type=int, default=0)
    p.add_argument("--attacker-rate", type=parse_rate, default=600.0)
    p.add_argument("--size-bytes", type=int, default=0)
    p.add_argument(
        "--stamp-created-ms",
        action="store_true",
        help="add sim_created_ms to every population message (latency benchmarks)",
    )
    p.add_argument("--callback-timeout-s", type=float, default=5.0)
    p.add_argument("--corp-id", default=defaults.corp_id)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    env = {
        "token": os.environ.get("QYWX_WECOM__TOKEN"),
        "encoding_aes_key": os.environ.get("QYWX_WECOM__ENCODING_AES_KEY"),
        "kf_secret": os.environ.get("QYWX_WECOM__KF_SECRET"),
    }
    settings = WeComSettings.model_validate(
        {"corp_id": args.corp_id, **{k: v for k, v in env.items() if v}}
    )
    state = WeComSimulatorState.from_settings(settings, rng=random.Random(args.seed))
    population = None
    if args.users > 0 and (args.rate > 0 or args.attackers > 0):
        population = PopulationConfig(
            open_kfids=args.open_kfids.split(","),
            users=args.users,
            rate_per_min=args.rate,
            burst_probability=args.burst_probability,
            burst_size=args.burst_size,
            attackers=args.attackers,
            attacker_rate_per_min=args.attacker_rate,
            size_bytes=args.size_bytes,
            stamp_created_ms=args.stamp_created_ms,
            **({"mix": args.mix} if args.mix else {}),
        )
    sim = WeComSimulator(
        state,
        callback_url=args.callback_url,
        callback_timeout_s=args.callback_timeout_s,
        population=population,
    )
    uvicorn.run(make_app(sim, manage_lifecycle=True), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
