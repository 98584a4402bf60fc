"""Async WeCom kf API client: access_token cache, sync_msg paging, send_msg, bounded retries.

Retryable failures (errcode -1/45009/45033, timeouts, connection errors, HTTP 5xx) are
retried with jittered exponential backoff, at most settings.max_retries times; anything
else raises at once. An invalidated token (40014/42001) is dropped from the shared cache
and the call retried once. This module must never log or put into an exception an
access_token, the kf secret or a callback token.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import httpx
import orjson
import redis.asyncio as aioredis

from qywx_ray.errors import WeComError
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter, histogram
from qywx_ray.retry import retry_async
from qywx_ray.wecom.errcodes import RETRYABLE, SYNC_TOKEN_INVALID, TOKEN_INVALID, ErrCode
from qywx_ray.wecom.models import SyncMsgPage
from qywx_ray.wecom.settings import WeComSettings

log = get_logger(__name__)

API_CALLS = counter("qywx_wecom_api_calls_total", "WeCom API calls by result", ["api", "result"])
API_RETRIES = counter("qywx_wecom_api_retries_total", "WeCom API retries", ["api"])
TOKEN_CACHE_ERRORS = counter(
    "qywx_wecom_token_cache_errors_total", "access_token cache (Redis) failures; fell back locally"
)
API_SECONDS = histogram("qywx_wecom_api_duration_seconds", "WeCom API call latency", ["api"])

_SECRET_PARAM = re.compile(r"(access_token|corpsecret)=[^&\s\"']+")


class RedactSecretsFilter(logging.Filter):
    """httpx logs every request URL at INFO; WeCom puts access_token/corpsecret in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            # Redact argument by argument: formatters such as uvicorn's access log unpack
            # record.args, so they must keep their shape.
            # Only arguments whose text changes are replaced (by their redacted text).
            record.args = tuple(_redact_arg(a) for a in record.args)
            record.msg = redact_secrets(str(record.msg))
            return True
        message = record.getMessage()
        redacted = redact_secrets(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


def redact_secrets(text: str) -> str:
    """`access_token=…` / `corpsecret=…` → `=***`."""
    return _SECRET_PARAM.sub(r"\1=***", text)


def _redact_arg(arg: object) -> object:
    if isinstance(arg, int | float):
        return arg
    text = str(arg)
    redacted = redact_secrets(text)
    return arg if redacted == text else redacted


def install_redaction(*logger_names: str) -> None:
    """Add RedactSecretsFilter to these loggers once (filters do not apply to records
    propagated from child loggers, so name the logger that emits)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecretsFilter) for f in logger.filters):
            logger.addFilter(RedactSecretsFilter())


install_redaction("httpx", "httpcore")

TRANSPORT_ERRCODE = ErrCode.SYSTEM_BUSY  # reported for timeouts, connection errors, HTTP 5xx
MAX_SYNC_LIMIT = 1000


class WeComTransientError(WeComError):
    """A retryable failure that persisted through every retry."""


class WeComTokenError(WeComError):
    """The access_token stayed invalid after one refresh."""


class TokenCache(Protocol):
    async def get(self, corp_id: str) -> str | None: ...

    async def set(self, corp_id: str, token: str, ttl_s: int) -> None: ...

    async def invalidate(self, corp_id: str, token: str) -> None:
        """Drop `token` if it is still the cached one (a newer one is kept)."""
        ...


class InMemoryTokenCache:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[str, tuple[str, float]] = {}

    async def get(self, corp_id: str) -> str | None:
        entry = self._tokens.get(corp_id)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    async def set(self, corp_id: str, token: str, ttl_s: int) -> None:
        self._tokens[corp_id] = (token, self._clock() + ttl_s)

    async def invalidate(self, corp_id: str, token: str) -> None:
        entry = self._tokens.get(corp_id)
        if entry is not None and entry[0] == token:
            del self._tokens[corp_id]


_DEL_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisTokenCache:
    """Shared by every replica: key qywx:wecom:access_token:{corp_id}, TTL expires_in - margin."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client

    @staticmethod
    def key(corp_id: str) -> str:
        return f"qywx:wecom:access_token:{corp_id}"

    async def get(self, corp_id: str) -> str | None:
        value = await self._client.get(self.key(corp_id))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def set(self, corp_id: str, token: str, ttl_s: int) -> None:
        await self._client.set(self.key(corp_id), token, ex=max(1, ttl_s))

    async def invalidate(self, corp_id: str, token: str) -> None:
        await self._client.eval(_DEL_IF_EQUAL, 1, self.key(corp_id), token)


def _json_body(resp: httpx.Response) -> Any:
    """The response's JSON. orjson first: a 1,000-message sync_msg page parses in half the
    time of httpx's stdlib json (bench/bench_syncer_path.py); whatever orjson refuses (a
    non-UTF-8 charset, NaN, an int beyond 64 bits) goes to resp.json(), whose ValueError
    the caller handles."""
    try:
        return orjson.loads(resp.content)
    except orjson.JSONDecodeError:
        return resp.json()


class _Retryable(Exception):
    def __init__(self, errcode: int, errmsg: str) -> None:
        self.errcode = errcode
        self.errmsg = errmsg


class WeComClient:
    """One client per (corp, kf secret); share it across tasks."""

    def __init__(
        self,
        settings: WeComSettings,
        token_cache: TokenCache,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._cache = token_cache
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._base = settings.api_base.rstrip("/")
        self._http = httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(settings.http_timeout_s)
        )
        self._token_lock = asyncio.Lock()
        self._local: tuple[str, float] | None = None  # (token, expiry) if the cache is down

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> WeComClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ----------------------------------------------------------------- retry core
    def backoff_s(self, attempt: int) -> float:
        """Delay before retry `attempt` (0-based): jittered exponential, ≤ retry_max_s."""
        s = self._settings
        cap = min(s.retry_max_s, s.retry_base_s * (2**attempt))
        return float(cap * (0.5 + 0.5 * self._rng.random()))

    async def _request_once(
        self, api: str, method: str, path: str, params: dict[str, str], body: Any
    ) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            resp = await self._http.request(method, f"{self._base}{path}", params=params, json=body)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise _Retryable(TRANSPORT_ERRCODE, type(exc).__name__) from None
        finally:
            API_SECONDS.observe(time.perf_counter() - started, api=api)
        if resp.status_code >= 500:
            raise _Retryable(TRANSPORT_ERRCODE, f"HTTP {resp.status_code}")
        try:
            data = _json_body(resp)
        except ValueError:
            if resp.status_code >= 400:
                raise WeComError(-2, f"HTTP {resp.status_code}", api=api) from None
            raise _Retryable(TRANSPORT_ERRCODE, "response is not JSON") from None
        if not isinstance(data, dict):
            raise _Retryable(TRANSPORT_ERRCODE, "response is not a JSON object")
        errcode = int(data.get("errcode", 0) or 0)
        if errcode in RETRYABLE:
            raise _Retryable(errcode, str(data.get("errmsg", "")))
        return data

    async def _with_retries(
        self, api: str, method: str, path: str, params: dict[str, str], body: Any
    ) -> dict[str, Any]:
        def on_retry(exc: BaseException, attempt: int, delay_s: float) -> None:
            assert isinstance(exc, _Retryable)
            API_RETRIES.inc(api=api)
            log.warning(
                "wecom.retry",
                api=api,
                errcode=exc.errcode,
                errmsg=exc.errmsg,
                attempt=attempt,
                delay_s=round(delay_s, 3),
            )

        try:
            return await retry_async(
                lambda: self._request_once(api, method, path, params, body),
                retry_on=(_Retryable,),
                wait=lambda state: self.backoff_s(state.attempt_number - 1),
                on_retry=on_retry,
                attempts=self._settings.max_retries + 1,
                sleep=self._sleep,
            )
        except _Retryable as exc:
            API_CALLS.inc(api=api, result="exhausted")
            raise WeComTransientError(exc.errcode, exc.errmsg, api=api) from None

    async def _call(self, api: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST with the access_token; on 40014/42001 refresh the token and retry once."""
        for refreshed in (False, True):
            token = await self.get_access_token()
            data = await self._with_retries(api, "POST", path, {"access_token": token}, body)
            errcode = int(data.get("errcode", 0) or 0)
            if errcode in TOKEN_INVALID:
                await self.invalidate_token(token)
                if refreshed:
                    API_CALLS.inc(api=api, result="token_error")
                    raise WeComTokenError(errcode, str(data.get("errmsg", "")), api=api)
                log.info("wecom.token_refresh", api=api, errcode=errcode)
                continue
            if errcode != 0:
                API_CALLS.inc(api=api, result="error")
                raise WeComError(errcode, str(data.get("errmsg", "")), api=api)
            API_CALLS.inc(api=api, result="ok")
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    # ----------------------------------------------------------------- token
    async def _cache_get(self) -> str | None:
        """The shared token; if the cache (Redis) fails, this process's own copy."""
        try:
            token = await self._cache.get(self._settings.corp_id)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: any failure falls back
            TOKEN_CACHE_ERRORS.inc()
            log.warning("wecom.token_cache_unavailable", op="get", error=type(exc).__name__)
            token = None
            if self._local is not None and self._local[1] > self._clock():
                token = self._local[0]
        return token

    async def get_access_token(self) -> str:
        token = await self._cache_get()
        if token:
            return token
        async with self._token_lock:  # one refresh per process at a time
            token = await self._cache_get()
            if token:
                return token
            corp_id = self._settings.corp_id
            params = {
                "corpid": corp_id,
                "corpsecret": self._settings.kf_secret.get_secret_value(),
            }
            data = await self._with_retries("gettoken", "GET", "/gettoken", params, None)
            errcode = int(data.get("errcode", 0) or 0)
            if errcode != 0 or not data.get("access_token"):
                API_CALLS.inc(api="gettoken", result="error")
                raise WeComError(errcode, str(data.get("errmsg", "")), api="gettoken")
            API_CALLS.inc(api="gettoken", result="ok")
            token = str(data["access_token"])
            expires_in = int(data.get("expires_in", 7200))
            ttl_s = max(1, expires_in - self._settings.token_refresh_margin_s)
            self._local = (token, self._clock() + ttl_s)
            try:
                await self._cache.set(corp_id, token, ttl_s)
            except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: any failure falls back
                TOKEN_CACHE_ERRORS.inc()
                log.warning("wecom.token_cache_unavailable", op="set", error=type(exc).__name__)
            return token

    async def invalidate_token(self, token: str) -> None:
        if self._local is not None and self._local[0] == token:
            self._local = None
        try:
            await self._cache.invalidate(self._settings.corp_id, token)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: any failure falls back
            TOKEN_CACHE_ERRORS.inc()
            log.warning("wecom.token_cache_unavailable", op="invalidate", error=type(exc).__name__)

    # ----------------------------------------------------------------- kf APIs
    async def sync_msg(
        self,
        open_kfid: str,
        cursor: str = "",
        token: str | None = None,
        limit: int = MAX_SYNC_LIMIT,
        voice_format: int = 0,
    ) -> SyncMsgPage:
        """One page of kf/sync_msg (limit capped at 1000)."""
        body: dict[str, Any] = {
            "open_kfid": open_kfid,
            "limit": max(1, min(int(limit), MAX_SYNC_LIMIT)),
            "voice_format": voice_format,
        }
        if cursor:
            body["cursor"] = cursor
        if token:
            body["token"] = token
        try:
            data = await self._call("kf/sync_msg", "/kf/sync_msg", body)
        except WeComError as exc:
            if not token or exc.errcode not in SYNC_TOKEN_INVALID:
                raise
            # The callback token lives 10 minutes; a late pull still works without it.
            log.info("wecom.sync_token_rejected", open_kfid=open_kfid, errcode=exc.errcode)
            body.pop("token")
            data = await self._call("kf/sync_msg", "/kf/sync_msg", body)
        return SyncMsgPage.from_response(data)

    async def iter_sync(
        self,
        open_kfid: str,
        cursor: str = "",
        token: str | None = None,
        limit: int = MAX_SYNC_LIMIT,
    ) -> AsyncIterator[SyncMsgPage]:
        """Pages until has_more is false, empty pages with has_more included.

        The caller commits page.next_cursor only after it has durably handled the page.
        """
        while True:
            page = await self.sync_msg(open_kfid, cursor, token, limit)
            yield page
            if page.next_cursor:
                cursor = page.next_cursor
            if not page.has_more:
                return

    async def send_msg(
        self,
        touser: str,
        open_kfid: str,
        msgtype: str,
        content: dict[str, Any],
        msgid: str | None = None,
    ) -> str:
        """Send a kf message to a customer; returns the msgid WeCom assigned/kept."""
        body: dict[str, Any] = {
            "touser": touser,
            "open_kfid": open_kfid,
            "msgtype": msgtype,
            msgtype: content,
        }
        if msgid:
            body["msgid"] = msgid
        data = await self._call("kf/send_msg", "/kf/send_msg", body)
        return str(data.get("msgid", msgid or ""))

    async def send_text(
        self, touser: str, open_kfid: str, content: str, msgid: str | None = None
    ) -> str:
        """send_msg with msgtype text (what consume's handlers call)."""
        return await self.send_msg(touser, open_kfid, "text", {"content": content}, msgid)

    async def send_msg_on_event(
        self, code: str, msgtype: str, content: dict[str, Any], msgid: str | None = None
    ) -> str:
        """Reply to an event (welcome_code / msg_code)."""
        body: dict[str, Any] = {"code": code, "msgtype": msgtype, msgtype: content}
        if msgid:
            body["msgid"] = msgid
        data = await self._call("kf/send_msg_on_event", "/kf/send_msg_on_event", body)
        return str(data.get("msgid", msgid or ""))
