"""The simulator's thin FastAPI layer, served in-process (httpx.ASGITransport) or by uvicorn
(cli.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from qywx_ray.process_tuning import gc_pauses
from qywx_ray.testing.wecomsim.runtime import WeComSimulator
from qywx_ray.testing.wecomsim.state import FaultRule
from qywx_ray.wecom.client import install_redaction


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
    # The simulator keeps every message it made (a stress run: millions): its collector's
    # pauses stall callbacks and sync_msg answers, so benches read them from /sim/stats.
    gc_pauses.install()

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
        return {
            **asdict(state.stats),
            "callbacks": list(sim.callback_log)[-20:],
            "gc": gc_pauses.stats(),
        }

    return app
