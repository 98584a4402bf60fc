"""WeCom callbacks and shed-path fakes shared by the shedding tests (unit and uvicorn).

Callbacks are encrypted and signed with the simulator's crypto, which is independent of
ours, so a test that decrypts one exercises our crypto against a second implementation.
"""

from __future__ import annotations

import base64
import random
import time
from typing import Any
from urllib.parse import urlencode

from qywx_ray.ingress.shedding import LoadShedder, RawCallback
from qywx_ray.testing.wecomsim import sim_encrypt, sim_sign
from qywx_ray.wecom.crypto import WeComCrypto
from qywx_ray.wecom.models import KfCallbackEvent

TOKEN = "cbtoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
CORP = "wwshedtest0001"
CRYPTO = WeComCrypto(TOKEN, AES_KEY, CORP)
Message = dict[str, Any]


def callback(
    open_kfid: str,
    ts: int | str,
    *,
    nonce: str | None = None,
    event: str = "kf_msg_or_event",
    received_at: float | None = None,
) -> RawCallback:
    """A real encrypted, signed callback for `open_kfid` with timestamp `ts` (a string for
    malformed ones), received now unless `received_at` says when."""
    inner = (
        f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><CreateTime>1</CreateTime>"
        f"<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event>"
        f"<Token><![CDATA[tok-{open_kfid}]]></Token>"
        f"<OpenKfId><![CDATA[{open_kfid}]]></OpenKfId></xml>"
    )
    encrypt = sim_encrypt(AES_KEY, CORP, inner, random.randbytes(16))
    nonce = nonce or str(random.getrandbits(40))
    sig = sim_sign(TOKEN, str(ts), nonce, encrypt)
    query = urlencode({"msg_signature": sig, "timestamp": ts, "nonce": nonce})
    body = f"<xml><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>".encode()
    return RawCallback(query.encode(), body, time.time() if received_at is None else received_at)


def junk(size: int) -> RawCallback:
    """Looks like a callback, signature is a guess: what an attacker can send."""
    encrypt = base64.b64encode(random.randbytes(max(16, size * 3 // 4 - 60))).decode()
    query = urlencode(
        {
            "msg_signature": f"{random.getrandbits(160):040x}",
            "timestamp": int(time.time()),
            "nonce": "1",
        }
    )
    return RawCallback(query.encode(), f"<xml><Encrypt>{encrypt}</Encrypt></xml>".encode(), 0.0)


class Overload(LoadShedder):
    """Overloaded while `on` (the test decides), whatever the in-flight count."""

    def __init__(self) -> None:
        super().__init__(max_inflight=0, max_loop_lag_s=0)
        self.on = True

    def overload_reason(self) -> str | None:
        return "inflight" if self.on else None


class RecordingSink:
    """The pull dispatcher's stand-in: keeps what it is given."""

    def __init__(self) -> None:
        self.events: list[KfCallbackEvent] = []
        self.sweeps = 0

    def submit(self, event: KfCallbackEvent) -> None:
        self.events.append(event)

    def sweep_soon(self) -> None:
        self.sweeps += 1


class App:
    """The router's stand-in: reads the whole body like it, then answers 200 'app'."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})
