"""Hostile input on the callback router, the crypto and the simulator: each test is an
attack that worked before the fix."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from uvicorn.logging import AccessFormatter

from qywx_ray.errors import CryptoError
from qywx_ray.ingress.callback import InMemoryReplayCache, make_callback_router
from qywx_ray.testing.wecomsim import (
    WeComSimulator,
    WeComSimulatorState,
    make_app,
    sim_encrypt,
    sim_sign,
)
from qywx_ray.wecom.crypto import MAX_MESSAGE_BYTES, BadLengthError, WeComCrypto
from qywx_ray.wecom.models import KfCallbackEvent

TOKEN = "cbtoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
CORP = "wwhostiletest01"
NOW = 1_760_000_000.0
URL = "http://ingress/wecom/callback"
CRYPTO = WeComCrypto(TOKEN, AES_KEY, CORP)
INNER = (
    f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><CreateTime>{int(NOW)}</CreateTime>"
    "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
    "<Token><![CDATA[ENCsecretsynctoken]]></Token><OpenKfId><![CDATA[wkKF1]]></OpenKfId></xml>"
)


class ListSink:
    def __init__(self) -> None:
        self.events: list[KfCallbackEvent] = []

    def submit(self, event: KfCallbackEvent) -> None:
        self.events.append(event)


@pytest.fixture
async def client_sink() -> AsyncIterator[tuple[httpx.AsyncClient, ListSink]]:
    sink = ListSink()
    app = FastAPI()
    app.include_router(make_callback_router(CRYPTO, sink, InMemoryReplayCache(), clock=lambda: NOW))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport) as client:
        yield client, sink


def signed(text: str, *, ts: str, nonce: str = "424242") -> tuple[dict[str, str], str]:
    enc = sim_encrypt(AES_KEY, CORP, text, random.randbytes(16))
    return {"msg_signature": sim_sign(TOKEN, ts, nonce, enc), "timestamp": ts, "nonce": nonce}, enc


def body(enc: str) -> bytes:
    return f"<xml><Encrypt><![CDATA[{enc}]]></Encrypt></xml>".encode()


# ---------------------------------------------------------------- item 3: GET URL check
async def test_get_url_check_refuses_a_stale_timestamp(
    client_sink: tuple[httpx.AsyncClient, ListSink],
) -> None:
    """A 30-day-old signature/timestamp/nonce is not a URL check WeCom is making now."""
    client, _ = client_sink
    params, enc = signed("1616140317555161061", ts=str(int(NOW) - 30 * 86400))
    resp = await client.get(URL, params={**params, "echostr": enc})
    assert resp.status_code == 403
    assert "1616140317555161061" not in resp.text


async def test_get_url_check_never_echoes_a_captured_callback(
    client_sink: tuple[httpx.AsyncClient, ListSink],
) -> None:
    """A POST's Encrypt resent as echostr decrypts to XML with the sync Token: refuse it."""
    client, sink = client_sink
    params, enc = signed(INNER, ts=str(int(NOW)))
    resp = await client.get(URL, params={**params, "echostr": enc})
    assert resp.status_code == 400
    assert "ENCsecretsynctoken" not in resp.text
    assert "wkKF1" not in resp.text
    assert sink.events == []
    # A real echostr still works.
    params, enc = signed("1616140317555161061", ts=str(int(NOW)))
    resp = await client.get(URL, params={**params, "echostr": enc})
    assert (resp.status_code, resp.text) == (200, "1616140317555161061")


# ---------------------------------------------------------------- item 5: replay by case
async def test_signature_case_does_not_bypass_the_replay_cache(
    client_sink: tuple[httpx.AsyncClient, ListSink],
) -> None:
    client, sink = client_sink
    params, enc = signed(INNER, ts=str(int(NOW)))
    sig = params["msg_signature"]
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(sig))
    for variant in (sig, sig.upper(), mixed):
        resp = await client.post(
            URL, params={**params, "msg_signature": variant}, content=body(enc)
        )
        assert (resp.status_code, resp.text) == (200, "success")
    assert len(sink.events) == 1


# ---------------------------------------------------------------- item 8: bad timestamps
@pytest.mark.parametrize(
    "timestamp", ["9" * 400, "-" + "9" * 400, "1_760_000_000", " 1760000000", "١٧٦٠٠٠٠٠٠٠", "+1"]
)
async def test_a_signed_callback_with_a_malformed_timestamp_is_400(
    client_sink: tuple[httpx.AsyncClient, ListSink], timestamp: str
) -> None:
    client, sink = client_sink
    params, enc = signed(INNER, ts=timestamp)
    resp = await client.post(URL, params=params, content=body(enc))
    assert resp.status_code == 400
    assert sink.events == []
    params, enc = signed("echo", ts=timestamp)
    resp = await client.get(URL, params={**params, "echostr": enc})
    assert resp.status_code == 400


# ---------------------------------------------------------------- item 12: crypto sizes
def test_encrypt_and_decrypt_agree_on_the_size_cap_and_say_so() -> None:
    at_cap = "a" * MAX_MESSAGE_BYTES
    assert CRYPTO.decrypt(CRYPTO.encrypt(at_cap)) == at_cap
    with pytest.raises(BadLengthError, match="1048576-byte limit"):
        CRYPTO.encrypt(at_cap + "a")
    # A peer that encrypts more anyway (here: the simulator's independent crypto).
    over = sim_encrypt(AES_KEY, CORP, at_cap + "a", b"r" * 16)
    with pytest.raises(BadLengthError) as info:
        CRYPTO.decrypt(over)
    assert "1048577" in str(info.value)
    assert "1048576-byte limit" in str(info.value)
    assert "exceeds the 1048585 bytes decrypted" not in str(info.value)
    assert isinstance(info.value, CryptoError)


def test_decrypt_still_names_a_length_beyond_the_data_truthfully() -> None:
    enc = CRYPTO.encrypt("hello")
    raw = bytearray(__import__("base64").b64decode(enc))
    # Corrupting ciphertext garbles the length; any error must be a CryptoError.
    raw[0] ^= 0xFF
    with pytest.raises(CryptoError):
        CRYPTO.decrypt(__import__("base64").b64encode(bytes(raw)).decode())


# ---------------------------------------------------------------- item 11: simulator
@pytest.fixture
def sim() -> WeComSimulatorState:
    return WeComSimulatorState(
        corp_id=CORP,
        kf_secret="simsecret-VALUE",
        callback_token=TOKEN,
        encoding_aes_key=AES_KEY,
        clock=lambda: NOW,
        rng=random.Random(3),
    )


async def test_simulator_answers_41001_without_access_token(sim: WeComSimulatorState) -> None:
    transport = httpx.ASGITransport(app=make_app(WeComSimulator(sim)))
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        for path in ("/cgi-bin/kf/sync_msg", "/cgi-bin/kf/send_msg"):
            resp = await client.post(path, json={})
            assert resp.json()["errcode"] == 41001, path
        resp = await client.post("/cgi-bin/kf/sync_msg?access_token=bogus", json={})
        assert resp.json()["errcode"] == 40014


def test_simulator_access_log_redacts_secrets(sim: WeComSimulatorState) -> None:
    """uvicorn's access logger gets the full path with query as an argument."""
    make_app(WeComSimulator(sim))  # installs the redaction on uvicorn.access
    logger = logging.getLogger("uvicorn.access")
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Capture()
    handler.setFormatter(AccessFormatter('%(client_addr)s "%(request_line)s" %(status_code)s'))
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.INFO
    try:
        for path in (
            "/cgi-bin/gettoken?corpid=ww1&corpsecret=simsecret-VALUE",
            "/cgi-bin/kf/sync_msg?access_token=AT-SECRET-123&debug=1",
        ):
            logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", path, "1.1", 200)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert len(records) == 2
    text = "\n".join(records)
    assert "simsecret-VALUE" not in text
    assert "AT-SECRET-123" not in text
    assert "corpsecret=***" in text
    assert "access_token=***" in text
    assert "200" in text
