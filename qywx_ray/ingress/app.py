"""The ingress app: assembles the callback path's routers and wraps them in one deployment.

- `deployment(settings)` is the Ray Serve application; serve/app.py's `build_app` (what
  `serve run serve.app:build_app` and serve/config.yaml name) loads settings and calls it.
- `create_app(settings)` is the same FastAPI app, for plain uvicorn and tests.

The callback path never waits on Kafka, WeCom or a pull: it verifies, decrypts,
replay-checks and hands the open_kfid to a coalescing dispatcher (ingress/dispatch.py);
under overload it answers 200 without decrypting (ingress/shedding.py). How to size and
run the deployment for WeCom's callback rate, with measured numbers: docs/operations.md
("Sizing the ingress").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from qywx_ray.admin.app import mount_admin, mount_private_openapi
from qywx_ray.admin.errors import install_error_handlers
from qywx_ray.ingress.callback import CallbackSink, RedisReplayCache, make_callback_router
from qywx_ray.ingress.dispatch import PullDispatcher
from qywx_ray.ingress.shedding import LoadShedder, ShedBacklog, ShedMiddleware, ShedSink
from qywx_ray.obs.logging import configure_logging, get_logger
from qywx_ray.obs.metrics import render_text
from qywx_ray.settings import Settings
from qywx_ray.store.client import make_async_redis
from qywx_ray.wecom.crypto import WeComCrypto

log = get_logger(__name__)

# Shutdown bounds: Serve stops routing to a replica, waits (up to the graceful timeout) for
# its in-flight callbacks to be answered, then runs the app's lifespan shutdown, where the
# pull requests still held are sent (bounded).
GRACEFUL_SHUTDOWN_TIMEOUT_S = 10.0
SHUTDOWN_FLUSH_TIMEOUT_S = 5.0


async def drain_pulls(sink: Any, timeout_s: float = SHUTDOWN_FLUSH_TIMEOUT_S) -> bool:
    """Send the pull requests this replica still holds, bounded; then stop the dispatcher.
    False when some could not be sent: nothing is lost (the cursor never moved past an
    unproduced message, and syncers sweep every open_kfid periodically), only delayed."""
    flush = getattr(sink, "flush", None)
    ok = True
    if flush is not None:
        try:
            async with asyncio.timeout(timeout_s):
                ok = bool(await flush())
        except TimeoutError:
            ok = False
    aclose = getattr(sink, "aclose", None)
    if aclose is not None:
        await aclose()
    if not ok:
        log.warning("ingress.pulls_unsent", pending=getattr(sink, "pending", None))
    return ok


def ray_pull_sender(settings: Settings) -> Any:
    """Send coalesced pull requests to the named syncer host actors (created on demand)."""
    from qywx_ray.ingress.syncer_host import get_syncer_host

    handles: dict[int, Any] = {}

    async def send(host: int, items: list[tuple[str, str]]) -> object:
        handle = handles.get(host)
        if handle is None:
            handle = handles[host] = get_syncer_host(settings, host)
        try:
            return await handle.request_pulls.options(enable_task_events=False).remote(items)
        except Exception:
            handles.pop(host, None)  # a dead handle: look the actor up again next time
            raise

    return send


class _NoSweep:
    """Adapts a plain CallbackSink (tests) to what the shedder needs."""

    def __init__(self, sink: CallbackSink) -> None:
        self.submit = sink.submit

    def sweep_soon(self) -> None:
        return None


def create_app(
    settings: Settings, *, sink: CallbackSink | None = None, admin: bool | None = None
) -> FastAPI:
    """The ingress app; `sink` defaults to a PullDispatcher feeding the syncer hosts.

    POST /wecom/callback passes ShedMiddleware first: it reads the body (bounded, with a
    deadline), and while this process is overloaded answers a signed callback 200
    without decrypting (ingress/shedding.py says why nothing is lost);
    otherwise the callback router verifies, decrypts, replay-checks and submits.
    Admin routes are mounted only when `admin` (default: `settings.admin.enabled`, off
    unless configured) says so: this app listens where WeCom can reach it.
    """
    if admin is None:
        admin = settings.admin.enabled
    s, w = settings.ingest, settings.wecom
    redis = make_async_redis(settings.redis)
    if sink is None:
        sink = PullDispatcher(
            ray_pull_sender(settings),
            s.num_syncer_hosts,
            s.callback_flush_interval_s,
            min_send_interval_s=s.callback_min_send_interval_s,
            known_kfids=s.open_kfids,
            sweep_delay_s=s.callback_shed_sweep_delay_s,
        )
    crypto = WeComCrypto(
        w.token.get_secret_value(), w.encoding_aes_key.get_secret_value(), w.corp_id
    )
    shedder = LoadShedder(
        max_inflight=s.callback_shed_max_inflight, max_loop_lag_s=s.callback_shed_max_loop_lag_s
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # Shutdown (Serve runs it after in-flight requests were answered): pulls first.
        await drain_pulls(app.state.sink)
        with contextlib.suppress(Exception):
            await redis.aclose()

    # The admin API shares the public listener: in production its map (the OpenAPI schema)
    # needs the admin token and the HTML docs (which fetch it without one) are off.
    production = settings.profile == "production"
    docs: dict[str, Any] = (
        {"docs_url": None, "redoc_url": None, "openapi_url": None} if production else {}
    )
    app = FastAPI(title="qywx-ray", version="0.1.0", lifespan=lifespan, **docs)
    install_error_handlers(app)
    app.state.sink = sink
    app.state.shedder = shedder
    app.add_middleware(
        ShedMiddleware,
        shedder=shedder,
        backlog=ShedBacklog(s.callback_shed_backlog, s.callback_shed_backlog_max_bytes),
        crypto=crypto,
        sink=cast(ShedSink, sink) if hasattr(sink, "sweep_soon") else _NoSweep(sink),
        max_skew_s=w.callback_max_skew_s,
        max_body_bytes=w.callback_max_body_bytes,
        body_timeout_s=w.callback_body_timeout_s,
    )
    app.include_router(
        make_callback_router(
            crypto,
            sink,
            RedisReplayCache(redis),
            max_skew_s=w.callback_max_skew_s,
            max_body_bytes=w.callback_max_body_bytes,
            replay_timeout_s=w.callback_replay_timeout_s,
        )
    )
    if admin:
        mount_admin(app, settings, redis)
    if production:
        mount_private_openapi(app, settings)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok"

    @app.get("/readyz")
    async def readyz() -> Response:
        """Development: each check with its error text. Production: only a status word
        (the errors name brokers and hosts; they are logged instead)."""
        checks = await readiness(settings, redis)
        ok = all(c["ok"] for c in checks.values())
        code = 200 if ok else 503
        if production:
            return JSONResponse({"status": "ready" if ok else "unavailable"}, status_code=code)
        return JSONResponse({"ready": ok, "checks": checks}, status_code=code)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return render_text()

    return app


async def readiness(settings: Settings, redis: Any) -> dict[str, dict[str, Any]]:
    """Kafka and Redis reachable, each within a short bound."""
    out: dict[str, dict[str, Any]] = {}
    try:
        async with asyncio.timeout(1.0):
            await redis.ping()
        out["redis"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001 - readiness reports every failure as not ready
        out["redis"] = {"ok": False, "error": str(exc)[:200]}
        log.warning("ingress.not_ready", check="redis", error=str(exc)[:200])

    def kafka_brokers() -> int:
        from confluent_kafka.admin import AdminClient

        from qywx_ray.kafka.config import admin_config

        md = AdminClient(admin_config(settings.kafka)).list_topics(timeout=2)
        return len(md.brokers)

    try:
        async with asyncio.timeout(3.0):
            brokers = await asyncio.to_thread(kafka_brokers)
        out["kafka"] = {"ok": brokers > 0, "brokers": brokers}
    except Exception as exc:  # noqa: BLE001 - readiness reports every failure as not ready
        out["kafka"] = {"ok": False, "error": str(exc)[:200]}
        log.warning("ingress.not_ready", check="kafka", error=str(exc)[:200])
    return out


def deployment(settings: Settings) -> Any:
    """The Serve application for these settings (replicas and concurrency from config)."""
    from ray import serve

    @serve.deployment(name="qywx-ingress")
    @serve.ingress()
    class Ingress:
        def __init__(self, settings: Settings) -> None:
            self.settings = settings
            configure_logging(self.settings.obs.log_level, self.settings.obs.log_format)

        def __serve_build_asgi_app__(self) -> FastAPI:
            return create_app(self.settings)

    s = settings.ingest
    return Ingress.options(  # type: ignore[attr-defined]
        num_replicas=s.serve_replicas,
        max_ongoing_requests=s.serve_max_ongoing_requests,
        graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
        logging_config={"enable_access_log": s.serve_access_log},
    ).bind(settings)
