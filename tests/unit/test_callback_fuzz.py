"""Fuzz the callback endpoint: the router behind ShedMiddleware,
in-process, with Hypothesis-generated sequences of signed, tampered, replayed and random
requests, with and without overload.

Asserted, and only this: every answer is one of the documented status codes (never a
5xx: ASGITransport re-raises app exceptions), a URL check never echoes markup, and the
sink receives exactly the callbacks that were signed, fresh, kf events and new (each
once) — whichever path (router or shed backlog) carried them.

Re-injected one at a time, each defect below makes it fail within its 150 derandomized
examples (~5 s): replay key without lowercasing, `int()` timestamps (400 digits: 500),
GET echoing markup, GET without the timestamp window, backlog without per-key dedupe,
unsigned shed callbacks answered 200 and queued.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qywx_ray.ingress.callback import InMemoryReplayCache, make_callback_router
from qywx_ray.ingress.shedding import LoadShedder, ShedBacklog, ShedMiddleware
from qywx_ray.testing.wecomsim import sim_encrypt, sim_sign
from qywx_ray.wecom.crypto import WeComCrypto
from qywx_ray.wecom.models import KfCallbackEvent

TOKEN = "fuzztoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
CORP = "wwfuzz0001"
NOW = 1_760_000_000
MAX_SKEW_S = 300
URL = "http://ingress/wecom/callback"
POST_STATUSES = {200, 400, 401, 403, 413}
GET_STATUSES = {200, 400, 401, 403}


class Sink:
    def __init__(self) -> None:
        self.events: list[KfCallbackEvent] = []
        self.sweeps = 0

    def submit(self, event: KfCallbackEvent) -> None:
        self.events.append(event)

    def sweep_soon(self) -> None:
        self.sweeps += 1


class Overload(LoadShedder):
    def __init__(self, on: bool) -> None:
        super().__init__(max_inflight=0, max_loop_lag_s=0)
        self.on = on

    def overload_reason(self) -> str | None:
        return "inflight" if self.on else None


@dataclass
class Req:
    method: str
    params: list[tuple[str, str]]
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    expect_kfid: str | None = None  # signed + fresh + kf event: delivered once if new
    key: tuple[str, str, str] | None = None  # (ts, nonce, signature lowercased) if signed
    echo: str | None = None  # GET: the plaintext a signed echostr carries
    may_succeed: bool = False  # False: any 200 is a failure (unsigned, stale, not an echostr)


_FRESH = re.compile(r"[0-9]{1,12}")


def _fresh(ts: str) -> bool:
    return bool(_FRESH.fullmatch(ts)) and abs(NOW - int(ts)) <= MAX_SKEW_S


_fresh_ts = st.integers(NOW - MAX_SKEW_S, NOW + MAX_SKEW_S).map(str)
timestamps = st.one_of(
    _fresh_ts,
    _fresh_ts,
    _fresh_ts,
    st.integers(0, 10**12).map(str),
    st.sampled_from(["9" * 400, "-1", "1_760_000_000", " 1760000000", "١٧٦٠٠٠٠٠٠٠", "", "+1"]),
    st.text(max_size=12),
)
_digits = st.text("0123456789", min_size=1, max_size=10)
nonces = st.one_of(
    _digits,
    _digits,
    _digits,
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=16),
)
ids = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=12
)
junk_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
headers = st.dictionaries(
    st.sampled_from(["content-type", "x-forwarded-for", "user-agent", "x-qywx-shed", "expect"]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    max_size=3,
)


def _inner(kind: str, kfid: str) -> str:
    if kind == "kf":
        return (
            f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><CreateTime>{NOW}</CreateTime>"
            "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
            f"<Token><![CDATA[tok{kfid}]]></Token><OpenKfId><![CDATA[{kfid}]]></OpenKfId></xml>"
        )
    if kind == "other_event":
        return "<xml><MsgType>event</MsgType><Event>enter_session</Event></xml>"
    if kind == "missing_fields":
        return "<xml><MsgType>event</MsgType><Event>kf_msg_or_event</Event></xml>"
    return "not xml <at all"


@st.composite
def signed_post(draw: st.DrawFn, serial: int) -> Req:
    ts, nonce = draw(timestamps), draw(nonces)
    kind = draw(st.sampled_from(["kf"] * 5 + ["other_event", "missing_fields", "text"]))
    kfid = f"wk{serial}x{draw(ids)}"
    encrypt = sim_encrypt(AES_KEY, CORP, _inner(kind, kfid), random.Random(serial).randbytes(16))
    signature = sim_sign(TOKEN, ts, nonce, encrypt)
    tamper = draw(st.sampled_from(["none"] * 4 + ["upper", "flip", "drop_sig", "extra_xml"]))
    body = f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    if tamper == "upper":
        signature = signature.upper()  # still valid: WeCom's hex is case-insensitive here
    elif tamper == "flip":
        signature = ("0" if signature[0] != "0" else "1") + signature[1:]
    elif tamper == "extra_xml":
        body = f"<xml><A>{draw(ids)}</A><Encrypt><![CDATA[{encrypt}]]></Encrypt><B/></xml>"
    params = [("msg_signature", signature), ("timestamp", ts), ("nonce", nonce)]
    if tamper == "drop_sig":
        params = params[1:]
    params += draw(
        st.lists(st.tuples(st.sampled_from(["x", "echostr", "a"]), junk_text), max_size=2)
    )
    # An empty parameter is a missing one (400) on both paths.
    signed = tamper in ("none", "upper", "extra_xml") and nonce != "" and ts != ""
    good = signed and _fresh(ts) and kind == "kf"
    return Req(
        "POST",
        params,
        body.encode(),
        draw(headers),
        expect_kfid=kfid if good else None,
        key=(ts, nonce, signature.lower()) if signed else None,
        may_succeed=signed and _fresh(ts),
    )


def resend_with_case(draw: st.DrawFn, req: Req) -> Req:
    """The same callback with its signature in another case: the same callback."""
    (name, sig), *rest = req.params
    assert name == "msg_signature"
    how = draw(st.sampled_from(["upper", "lower", "mixed"]))
    if how == "mixed":
        variant = "".join(c.upper() if k % 2 else c.lower() for k, c in enumerate(sig))
    else:
        variant = sig.upper() if how == "upper" else sig.lower()
    return Req(
        req.method,
        [(name, variant), *rest],
        req.body,
        req.headers,
        req.expect_kfid,
        req.key,
        req.echo,
        req.may_succeed,
    )


@st.composite
def signed_get(draw: st.DrawFn, serial: int) -> Req:
    ts, nonce = draw(timestamps), draw(nonces)
    plain = draw(
        st.one_of(
            st.integers(0, 10**19).map(str),
            st.just(_inner("kf", f"wk{serial}")),
            st.text(
                st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=30
            ),
        )
    )
    encrypt = sim_encrypt(AES_KEY, CORP, plain, random.Random(serial).randbytes(16))
    signature = sim_sign(TOKEN, ts, nonce, encrypt)
    forged = draw(st.booleans())
    if forged:
        signature = signature[::-1]
    params = [
        ("msg_signature", signature),
        ("timestamp", ts),
        ("nonce", nonce),
        ("echostr", encrypt),
    ]
    # What WeCom's echostr decrypts to: short, printable, no markup (a captured POST's
    # Encrypt decrypts to XML and must never be echoed).
    echo_like = 0 < len(plain) <= 1024 and plain.isprintable() and "<" not in plain
    ok = not forged and nonce != "" and _fresh(ts) and echo_like
    return Req("GET", params, headers=draw(headers), echo=plain, may_succeed=ok)


@st.composite
def random_request(draw: st.DrawFn) -> Req:
    names = st.sampled_from(["msg_signature", "timestamp", "nonce", "echostr", "x"])
    params = draw(st.lists(st.tuples(names, junk_text), max_size=5))
    body = draw(
        st.one_of(
            st.binary(max_size=200),
            st.builds(lambda s: f"<xml><Encrypt>{s}</Encrypt></xml>".encode(), junk_text),
            st.just(b"<!DOCTYPE x [<!ENTITY e 'x'>]><xml><Encrypt>&e;</Encrypt></xml>"),
            st.just(b"<" * 70_000),  # over max_body_bytes
        )
    )
    return Req(draw(st.sampled_from(["GET", "POST"])), params, body, draw(headers))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[bool, list[Req]]:
    reqs: list[Req] = []
    for serial in range(draw(st.integers(1, 8))):
        choice = draw(
            st.sampled_from(["signed_post"] * 3 + ["replay"] * 3 + ["signed_get"] * 2 + ["random"])
        )
        if choice == "replay" and reqs:
            again = draw(st.sampled_from(reqs))
            signed = bool(again.params) and again.params[0][0] == "msg_signature"
            reqs.append(resend_with_case(draw, again) if signed and draw(st.booleans()) else again)
        elif choice == "signed_get":
            reqs.append(draw(signed_get(serial)))
        elif choice == "random":
            reqs.append(draw(random_request()))
        else:
            reqs.append(draw(signed_post(serial)))
    return draw(st.booleans()), reqs


async def _run(overloaded: bool, reqs: list[Req]) -> None:
    sink = Sink()
    app = FastAPI()
    crypto = WeComCrypto(TOKEN, AES_KEY, CORP)
    app.include_router(
        make_callback_router(
            crypto, sink, InMemoryReplayCache(clock=lambda: 0.0), clock=lambda: float(NOW)
        )
    )
    mw = ShedMiddleware(
        app,
        shedder=Overload(overloaded),
        backlog=ShedBacklog(1000),
        crypto=crypto,
        sink=sink,
        drain_interval_s=3600,  # drained below, once, so the check is exact
        wall_clock=lambda: float(NOW),
    )
    expected: Counter[str] = Counter()
    seen: set[tuple[str, str, str]] = set()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw)) as client:
            for req in reqs:
                resp = await client.request(
                    req.method,
                    URL,
                    params=req.params,  # type: ignore[arg-type]  # third-party stubs
                    content=req.body or None,
                    headers=req.headers,
                )
                allowed = GET_STATUSES if req.method == "GET" else POST_STATUSES
                assert resp.status_code in allowed, (req, resp.status_code, resp.text)
                if req.method == "GET" and resp.status_code == 200:
                    assert "<" not in resp.text
                    assert resp.text == req.echo
                if req.method == "GET" and req.may_succeed:
                    assert resp.status_code == 200, (req, resp.text)
                if not req.may_succeed:
                    assert resp.status_code != 200, (req, resp.text)
                if req.expect_kfid is not None:
                    assert resp.status_code == 200, (req, resp.text)
                    assert req.key is not None
                    if req.key not in seen:
                        expected[req.expect_kfid] += 1
                if req.key is not None:
                    seen.add(req.key)
        if overloaded:
            await mw._drain_once()
    finally:
        await mw.aclose()
    assert Counter(e.open_kfid for e in sink.events) == expected


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_callback_fuzz(scenario: tuple[bool, list[Req]]) -> None:
    overloaded, reqs = scenario
    asyncio.run(_run(overloaded, reqs))


def test_the_fuzz_oracle_sees_a_delivery() -> None:
    """The property is not vacuous: a fixed signed, fresh kf callback sent twice is
    delivered once, through the router and through the shed backlog."""
    for overloaded in (False, True):
        encrypt = sim_encrypt(AES_KEY, CORP, _inner("kf", "wkFixed"), b"r" * 16)
        params = [
            ("msg_signature", sim_sign(TOKEN, str(NOW), "n", encrypt)),
            ("timestamp", str(NOW)),
            ("nonce", "n"),
        ]
        body = f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode()
        good = Req(
            "POST",
            params,
            body,
            expect_kfid="wkFixed",
            key=(str(NOW), "n", params[0][1]),
            may_succeed=True,
        )
        asyncio.run(_run(overloaded, [good, good]))
