"""Callback path benchmark: real encrypted WeCom callbacks, Ray Serve settings vs plain uvicorn.

wrk (Lua) posts pre-generated REAL callbacks — encrypted and signed with the simulator's
independent crypto, each with a unique nonce (so the replay cache never short-circuits
them) and a timestamp inside the skew window — to the ingress, while the WeCom simulator's
customers keep writing and the syncer hosts keep pulling into Kafka. Per case and
connection count it reports sustained callbacks/s, p50/p99/max latency, requests not
answered within WeCom's 5 s (wrk timeouts), non-200s, shed callbacks (x-qywx-shed
header), and whether ingest kept up (simulator messages vs records in Kafka).

Cases (each Serve case runs the same app, `qywx_ray.ingress.app.deployment`, in a fresh local Ray
whose env the proxy and replicas inherit; Serve access log off unless said):
  serve_mor5        max_ongoing_requests=5 (Serve's default), 1 replica, via the proxy
  serve_mor256      max_ongoing_requests=256, 1 replica, via the proxy (project default)
  serve_2replicas   serve_mor256 with 2 replicas
  serve_sameloop    serve_mor256 + RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and
                    RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0
  serve_noka        serve_mor256, every request on a new connection (Connection: close)
  serve_direct      RAY_SERVE_ENABLE_DIRECT_INGRESS=1: clients call the ingress replica's
                    own HTTP port, no proxy hop
  serve_throughput  RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress, user code and router
                    on the replica's loop, gRPC, buffered request logs), replica port
  serve_throughput_accesslog   the same with Serve's per-request access log on
  uvicorn           the same create_app on plain uvicorn (uvloop + httptools), 1 process

    python -m bench.bench_callbacks [--cases serve_mor256 uvicorn] [--duration-s 10]
Prints JSON lines only (bench.output.emit); diagnostics on stderr. Stops what it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from bench.output import Emitter, log
from bench.runs import default_runs, quick_mode
from bench.services import bench_services

BENCH = "callbacks"
# Ray prints raylet notices on the driver's stdout: keep the JSON stream apart (see main).
_OUT = Emitter()


def emit(**fields: Any) -> None:
    _OUT.emit(**fields)


WECOM_TIMEOUT_S = 5

SERVE_CASES: dict[str, dict[str, Any]] = {
    "serve_mor5": {"replicas": 1, "max_ongoing": 5, "env": {}},
    "serve_mor256": {"replicas": 1, "max_ongoing": 256, "env": {}},
    "serve_2replicas": {"replicas": 2, "max_ongoing": 256, "env": {}},
    "serve_sameloop": {
        "replicas": 1,
        "max_ongoing": 256,
        "env": {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
        },
    },
    "serve_noka": {"replicas": 1, "max_ongoing": 256, "env": {}, "close": True},
    # The ingress replica runs its own HTTP server; clients (a load balancer) hit it
    # directly, skipping the proxy actor's extra hop.
    "serve_direct": {
        "replicas": 1,
        "max_ongoing": 256,
        "env": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
        "direct": True,
    },
    "serve_throughput": {
        "replicas": 1,
        "max_ongoing": 256,
        "env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
        "direct": True,
    },
    "serve_throughput_accesslog": {
        "replicas": 1,
        "max_ongoing": 256,
        "env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
        "direct": True,
        "access_log": True,
    },
}
ALL_CASES = [*SERVE_CASES, "uvicorn"]

WRK_LUA = r"""
-- Posts pre-generated callbacks (one "path?query<TAB>body" per line); thread k of n
-- takes every n-th line, so no two requests share a nonce until the corpus wraps.
local threads = {}
local next_id = 1
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end
function init(args)
  lines = {}
  local n, nthreads = 0, tonumber(args[2])
  for line in io.lines(args[1]) do
    if n % nthreads == id - 1 then
      local tab = line:find("\t", 1, true)
      table.insert(lines, {line:sub(1, tab - 1), line:sub(tab + 1)})
    end
    n = n + 1
  end
  i, shed, non200 = 0, 0, 0
  headers = {["Content-Type"] = "text/xml"}
  if args[3] == "close" then headers["Connection"] = "close" end
end
function request()
  i = i + 1
  local cb = lines[((i - 1) % #lines) + 1]
  return wrk.format("POST", cb[1], headers, cb[2])
end
function response(status, hdrs, body)
  if status ~= 200 then non200 = non200 + 1 end
  if hdrs["x-qywx-shed"] then shed = shed + 1 end
end
function done(summary, latency, requests)
  local s, b, sent = 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("shed"); b = b + t:get("non200"); sent = sent + t:get("i")
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,' ..
    '"timeouts":%d,"shed":%d,"non200":%d,"sent":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, s, b, sent))
end
"""


# ------------------------------------------------------------------ callback corpus
def make_corpus(settings: Any, kfids: list[str], n: int, path: Path) -> None:
    """n distinct real callbacks, timestamps now (valid for callback_max_skew_s)."""
    from qywx_ray.testing.wecomsim import sim_encrypt, sim_sign

    w = settings.wecom
    token, key, corp = w.token.get_secret_value(), w.encoding_aes_key.get_secret_value(), w.corp_id
    rng = random.Random()
    ts = str(int(time.time()))
    with path.open("w") as f:
        for i in range(n):
            kfid = kfids[i % len(kfids)]
            inner = (
                f"<xml><ToUserName><![CDATA[{corp}]]></ToUserName><CreateTime>{ts}</CreateTime>"
                "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
                f"<Token><![CDATA[]]></Token><OpenKfId><![CDATA[{kfid}]]></OpenKfId></xml>"
            )
            encrypt = sim_encrypt(key, corp, inner, rng.randbytes(16))
            nonce = f"{i}x{rng.getrandbits(48)}"
            query = urlencode(
                {
                    "msg_signature": sim_sign(token, ts, nonce, encrypt),
                    "timestamp": ts,
                    "nonce": nonce,
                }
            )
            body = (
                f"<xml><ToUserName><![CDATA[{corp}]]></ToUserName>"
                f"<Encrypt><![CDATA[{encrypt}]]></Encrypt><AgentID><![CDATA[]]></AgentID></xml>"
            )
            f.write(f"/wecom/callback?{query}\t{body}\n")


def run_wrk(
    url: str, corpus: Path, script: Path, connections: int, duration_s: int, close: bool
) -> dict[str, Any]:
    threads = 2
    argv = [
        shutil.which("wrk") or "/usr/bin/wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        f"{WECOM_TIMEOUT_S}s",
        "-s",
        str(script),
        url,
        "--",
        str(corpus),
        str(threads),
        "close" if close else "keep",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            return dict(json.loads(line[len("WRKJSON ") :]))
    raise RuntimeError(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")


# ------------------------------------------------------------------ the stack
def overrides_for(svc: Any, api_base: str, tag: str, case: dict[str, Any]) -> dict[str, Any]:
    return {
        "kafka": {
            "bootstrap_servers": svc.bootstrap_servers,
            "main_topic": {"name": f"bench-cb-{tag}"},
            "dlq_topic": {"name": f"bench-cb-dlq-{tag}"},
            "consumer": {"group_id": f"bench-cb-{tag}"},
        },
        "redis": {"url": svc.redis_url},
        "wecom": {"api_base": api_base},
        "consume": {"namespace": f"bench-cb-{tag}"},
        "ingest": {
            "serve_replicas": case.get("replicas", 1),
            "serve_max_ongoing_requests": case.get("max_ongoing", 256),
            "sweep_interval_s": 5.0,
            "serve_access_log": case.get("access_log", False),
        },
        "obs": {"log_level": "WARNING"},
    }


def drop_topics(settings: Any) -> None:
    """Delete the topics this case created (the bench may run on shared services)."""
    from confluent_kafka.admin import AdminClient

    from qywx_ray.kafka.config import admin_config

    names = [settings.kafka.main_topic.name, settings.kafka.dlq_topic.name]
    with contextlib.suppress(Exception):
        for fut in AdminClient(admin_config(settings.kafka)).delete_topics(names).values():
            with contextlib.suppress(Exception):
                fut.result(timeout=30)


def kafka_count(settings: Any) -> int:
    from confluent_kafka import Consumer, TopicPartition

    from qywx_ray.kafka.config import consumer_config

    c = Consumer(consumer_config(settings.kafka, group_id=f"bench-count-{uuid.uuid4().hex[:6]}"))
    try:
        md = c.list_topics(settings.kafka.main_topic.name, timeout=10)
        parts = md.topics[settings.kafka.main_topic.name].partitions
        total = 0
        for p in parts:
            lo, hi = c.get_watermark_offsets(
                TopicPartition(settings.kafka.main_topic.name, p), timeout=10
            )
            total += hi - lo
        return total
    finally:
        c.close()


def ingest_caught_up(settings: Any, sim: Any, timeout_s: float) -> tuple[int, float | None]:
    """(backlog right now, seconds until Kafka held every simulator message or None)."""
    produced = sim.stats()["messages"]
    backlog = produced - kafka_count(settings)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if kafka_count(settings) >= produced:
            return backlog, time.monotonic() - started
        time.sleep(0.5)
    return backlog, None


def measure(
    case: str,
    url: str,
    settings: Any,
    sim: Any,
    workdir: Path,
    args: argparse.Namespace,
    run: int,
    close: bool = False,
) -> None:
    script = workdir / "callbacks.lua"
    script.write_text(WRK_LUA)
    for conns in args.connections:
        corpus = workdir / f"corpus-{case}-{conns}-{run}.txt"
        make_corpus(settings, args.case_kfids, args.corpus, corpus)
        res = run_wrk(url, corpus, script, conns, args.duration_s, close)
        corpus.unlink()
        rate = res["requests"] / (res["duration_us"] / 1e6)
        errors = sum(res[k] for k in ("connect_errors", "read_errors", "write_errors"))
        backlog, catchup_s = ingest_caught_up(settings, sim, timeout_s=30)
        common = {"bench": BENCH, "case": case, "run": run, "concurrency": conns}
        extra = {
            **res,
            "errors": errors,
            "ingest_backlog_at_end": backlog,
            "ingest_catchup_s": catchup_s,
            "corpus_wrapped": res["sent"] > args.corpus,
        }
        emit(**common, metric="throughput", value=round(rate, 1), unit="callbacks/s", extra=extra)
        emit(**common, metric="latency_p50", value=res["p50_us"] / 1000, unit="ms")
        emit(**common, metric="latency_p99", value=res["p99_us"] / 1000, unit="ms")
        emit(**common, metric="timeouts_5s", value=res["timeouts"], unit="requests")
        emit(**common, metric="shed", value=res["shed"], unit="requests")
        log(
            f"{case} c={conns} run={run}: {rate:.0f}/s p50 {res['p50_us'] / 1000:.1f} ms "
            f"p99 {res['p99_us'] / 1000:.1f} ms max {res['max_us'] / 1000:.0f} ms "
            f"timeouts {res['timeouts']} non200 {res['non200']} errors {errors} "
            f"shed {res['shed']} ingest backlog {backlog} caught up in {catchup_s}"
        )


def sim_for(workdir: Path, args: argparse.Namespace, http_port: int) -> Any:
    """The simulator (not started): its customers write, it pushes callbacks to the ingress."""
    from qywx_ray.devstack.simproc import SimulatorProcess

    return SimulatorProcess(
        workdir / f"sim-{uuid.uuid4().hex[:6]}",
        f"http://127.0.0.1:{http_port}/wecom/callback",
        extra_args=[
            "--users",
            str(args.users),
            "--rate",
            f"{args.rate_per_min}/min",
            "--open-kfids",
            ",".join(args.case_kfids),
        ],
    )


def settings_and_sim(
    name: str,
    svc: Any,
    args: argparse.Namespace,
    workdir: Path,
    case: dict[str, Any],
    http_port: int = 0,
) -> tuple[Any, Any, int, dict[str, Any]]:
    from qywx_ray.devstack.procs import free_port
    from qywx_ray.kafka.topics import ensure_topics
    from qywx_ray.settings import load_settings

    http_port = http_port or free_port()
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    # Fresh open_kfids per case: a cursor left in Redis by an earlier case must not apply.
    args.case_kfids = [f"wk{uuid.uuid4().hex[:10]}{i}" for i in range(args.kfids)]
    sim = sim_for(workdir, args, http_port)
    overrides = overrides_for(svc, sim.api_base, tag, case)
    settings = load_settings(profile="development", overrides=overrides)
    ensure_topics(settings.kafka)
    # Syncer hosts resume every open_kfid remembered in Redis: forget earlier cases' ones,
    # or each case would also sweep the (idle) accounts of all the cases before it.
    import redis

    from qywx_ray.ingress.syncer_host import known_kfids_key

    redis.Redis.from_url(settings.redis.url).delete(known_kfids_key(settings.ingest.key_prefix))
    return settings, sim, http_port, overrides


@contextlib.contextmanager
def ray_with_env(env: dict[str, str], namespace: str) -> Iterator[str]:
    """A fresh local Ray whose workers (proxy, replicas) see `env`; yields its GCS address."""
    import ray

    saved = dict(os.environ)
    os.environ.update(env)  # the raylet, and so every worker, inherits the driver's env
    try:
        ray.init(namespace=namespace, include_dashboard=False, log_to_driver=False)
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def run_serve_case(name: str, svc: Any, args: argparse.Namespace, workdir: Path, runs: int) -> None:
    from ray import serve

    from qywx_ray.devstack.procs import free_port
    from qywx_ray.ingress.app import deployment

    case = SERVE_CASES[name]
    env = dict(case["env"])
    if case.get("direct"):
        # The replica's own port: the simulator and wrk call it, not the proxy.
        port = free_port()
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)
        settings, sim, _, _ = settings_and_sim(name, svc, args, workdir, case, http_port=port)
        proxy_port = free_port()
    else:
        settings, sim, port, _ = settings_and_sim(name, svc, args, workdir, case)
        proxy_port = port
    url = f"http://127.0.0.1:{port}"
    with ray_with_env(env, settings.ray_namespace):
        try:
            serve.start(
                http_options={"host": "127.0.0.1", "port": proxy_port, "keep_alive_timeout_s": 30}
            )
            serve.run(deployment(settings), name="qywx", route_prefix="/")
            sim.start()
            warm_up(url)
            for run in range(runs):
                close = bool(case.get("close", False))
                measure(name, url, settings, sim, workdir, args, run, close=close)
        finally:
            sim.stop()  # the Ray instance is this case's own: ray.shutdown() ends the rest
    drop_topics(settings)


def run_uvicorn_case(svc: Any, args: argparse.Namespace, workdir: Path, runs: int) -> None:
    from qywx_ray.devstack.procs import ManagedProcess, kill_named_actors, port_open, wait_until

    settings, sim, port, overrides = settings_and_sim("uvicorn", svc, args, workdir, {})
    with ray_with_env({}, settings.ray_namespace) as gcs_address:
        spec = workdir / "uvicorn-overrides.json"
        spec.write_text(json.dumps(overrides))
        app = ManagedProcess(
            f"uvicorn-{port}",
            [
                sys.executable,
                __file__,
                "--serve-uvicorn",
                str(spec),
                "--port",
                str(port),
                "--ray-address",
                gcs_address,
            ],
            workdir / "uvicorn",
        )
        try:
            app.start()
            wait_until(lambda: port_open(port), timeout_s=60, what="the uvicorn ingress")
            sim.start()
            warm_up(f"http://127.0.0.1:{port}")
            for run in range(runs):
                measure("uvicorn", f"http://127.0.0.1:{port}", settings, sim, workdir, args, run)
        finally:
            sim.stop()
            app.stop()
            with contextlib.suppress(Exception):
                kill_named_actors(settings.ray_namespace)
    drop_topics(settings)


def warm_up(url: str) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{url} never became healthy")


def serve_uvicorn(spec: Path, port: int, ray_address: str) -> None:
    """Child mode: the same create_app on plain uvicorn, connected to the bench's Ray."""
    import ray
    import uvicorn

    from qywx_ray.ingress.app import create_app
    from qywx_ray.settings import load_settings

    settings = load_settings(profile="development", overrides=json.loads(spec.read_text()))
    ray.init(address=ray_address, namespace=settings.ray_namespace, log_to_driver=False)
    uvicorn.run(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=30,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="*", default=None, choices=ALL_CASES)
    p.add_argument("--connections", nargs="*", type=int, default=[16, 64])
    p.add_argument("--duration-s", type=int, default=None)
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--corpus", type=int, default=None, help="distinct callbacks per wrk run")
    p.add_argument("--kfids", type=int, default=5, help="open_kfids the callbacks name")
    p.add_argument("--users", type=int, default=200, help="simulated customers")
    p.add_argument("--rate-per-min", type=float, default=30.0, help="per customer")
    p.add_argument("--serve-uvicorn", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ray-address", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_uvicorn is not None:
        serve_uvicorn(args.serve_uvicorn, args.port, args.ray_address)
        return
    # Only JSON lines on stdout: a private copy of fd 1 carries them; everything else
    # written to fd 1 (Ray's notices, print) goes to stderr.
    _OUT.stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    quick = quick_mode()
    args.duration_s = args.duration_s or (5 if quick else 10)
    args.corpus = args.corpus or (10_000 if quick else 20_000)
    runs = args.runs or default_runs(3)
    # The full default fits the harness's 900 s; `--cases` runs any (all: ~17 min).
    default_cases = ["serve_mor5", "serve_mor256", "serve_direct", "serve_throughput", "uvicorn"]
    cases = args.cases or (["serve_mor256", "uvicorn"] if quick else default_cases)
    workdir = Path(tempfile.mkdtemp(prefix="qywx-bench-cb-"))
    try:
        with bench_services() as svc:
            for name in cases:
                log(f"bench callbacks: case {name}")
                try:
                    if name == "uvicorn":
                        run_uvicorn_case(svc, args, workdir, runs)
                    else:
                        run_serve_case(name, svc, args, workdir, runs)
                except Exception as exc:
                    log(f"case {name} failed: {exc!r}")
                    emit(kind="error", bench=BENCH, case=name, run=0, error=repr(exc)[:500])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
