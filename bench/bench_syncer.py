"""Syncer capacity: how many msg/s one WeCom account's KfSyncer moves from sync_msg to Kafka.

The part of "one account end to end >= 10,000 msg/s" that only ingest decides: one syncer
pulls pages of 1,000 messages and produces each page confirmed before the next cursor
commit, on one core. Cases:

- `path_cpu` (in process, no IO): CPU per message of what the syncer does to a page -
  WeComClient.sync_msg's parse (page bytes served by an httpx MockTransport), envelope,
  record bytes, headers, key. The ceiling of the pure-Python part.
- `one_account`: one syncer host process (real KfSyncer from build_ingest: real Kafka
  producer, Redis lock, fenced cursor, spool check), sync_msg answered by a
  MockTransport from pre-encoded pages (the WeCom side costs nothing here): msg/s and the
  host process's CPU per message (librdkafka threads included), lost=0 checked from the
  syncer's own counts (every message produced and acked, none spooled) and the cursor.
- `two_accounts`: two such hosts at once, one account each; the two open_kfids are
  chosen so that syncer_host_index() puts them on different syncer hosts (what the Ray
  deployment does): aggregate msg/s and the ratio to one account.

`--wecom-rtt-ms N`: each sync_msg answer is delayed N ms (awaited, no CPU), as from a
WeCom across the network, where the page's round trip, not the syncer's CPU, may decide
an account's throughput; lines then carry `wecom_rtt_ms`.

Every line carries load1 (the machine is shared: compare runs made back to back).

  python -m bench.bench_syncer [--quick] [--messages 50000] [--only one_account]
                               [--wecom-rtt-ms 30]
"""

# bench-timeout-s: full=900 quick=300

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.output import emit, log
from bench.runs import ROOT, default_runs, quick_mode
from bench.services import bench_services
from bench.stats import median

PAGE = 1000
USERS = 10_000
CONTENT_BYTES = 800  # ~1 KiB record with its envelope


def make_pages(open_kfid: str, messages: int, tag: str) -> list[bytes]:
    """sync_msg answers, pre-encoded like the simulator's (compact JSON, UTF-8)."""
    pages: list[bytes] = []
    for start in range(0, messages, PAGE):
        msg_list = [
            {
                "msgid": f"{tag}{i:010d}",
                "open_kfid": open_kfid,
                "external_userid": f"wmBench{i % USERS:06d}",
                "send_time": 1_700_000_000 + i // 1000,
                "origin": 3,
                "msgtype": "text",
                "text": {"content": f"#{i} " + "x" * CONTENT_BYTES},
            }
            for i in range(start, min(start + PAGE, messages))
        ]
        last = start + PAGE >= messages
        page = {
            "errcode": 0,
            "errmsg": "ok",
            "next_cursor": str(len(pages) + 1),
            "has_more": 0 if last else 1,
            "msg_list": msg_list,
        }
        pages.append(json.dumps(page, ensure_ascii=False, separators=(",", ":")).encode())
    return pages


RTT_ENV = "QYWX_BENCH_WECOM_RTT_MS"  # set by main from --wecom-rtt-ms; host processes inherit it


def wecom_rtt_ms() -> float:
    return float(os.environ.get(RTT_ENV) or 0)


def mock_wecom(pages: list[bytes]) -> Any:
    """An httpx transport answering gettoken and sync_msg (cursor = page index)."""
    import httpx

    token = b'{"errcode":0,"errmsg":"ok","access_token":"bench","expires_in":7200}'

    rtt_s = wecom_rtt_ms() / 1000.0

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/gettoken"):
            return httpx.Response(200, content=token)
        body = json.loads(request.content or b"{}")
        index = int(body.get("cursor") or 0)
        if index >= len(pages):
            return httpx.Response(200, content=b'{"errcode":0,"next_cursor":"","has_more":0}')
        return httpx.Response(200, content=pages[index])

    async def across_the_network(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(rtt_s)  # WeCom's answer travels; the syncer's CPU is free meanwhile
        return answer(request)

    return httpx.MockTransport(across_the_network if rtt_s > 0 else answer)


def wecom_client(pages: list[bytes]) -> Any:
    from qywx_ray.wecom.client import InMemoryTokenCache, WeComClient
    from qywx_ray.wecom.settings import WeComSettings

    return WeComClient(
        WeComSettings(api_base="http://wecom.bench/cgi-bin"),
        InMemoryTokenCache(),
        transport=mock_wecom(pages),
    )


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------ path_cpu (in process)
async def path_cpu_once(pages: list[bytes]) -> float:
    """CPU µs per message: parse every page through the client, envelope, bytes, headers."""
    from qywx_ray.envelope import ingest_envelope

    client = wecom_client(pages)
    await client.sync_msg("wkBench", "0")  # token fetched outside the measurement
    n = 0
    started = time.process_time()
    for index in range(len(pages)):
        page = await client.sync_msg("wkBench", str(index))
        ts_ms = int(time.time() * 1000)
        for msg in page.msg_list:
            env = ingest_envelope(msg, ingest_ts_ms=ts_ms)
            assert env is not None
            env.to_bytes()
            env.headers()
            env.key  # noqa: B018 - the producer reads it
            n += 1
    elapsed = time.process_time() - started
    await client.aclose()
    return elapsed / n * 1e6


# ------------------------------------------------------------------ one syncer host (child)
async def host_run(where_json: str, open_kfid: str, messages: int, tag: str) -> dict[str, Any]:
    """One syncer host: prepare, say ready, wait for go (stdin), pull everything, report."""
    import tempfile

    from bench.services import settings_for
    from qywx_ray.ingest.factory import build_ingest

    where = json.loads(where_json)
    settings = settings_for(
        where["bootstrap"],
        where["redis_url"],
        Path(tempfile.gettempdir()),
        {"kafka": {"main_topic": {"name": where["topic"]}}},
    )
    pages = make_pages(open_kfid, messages, tag)
    parts = build_ingest(settings)
    client = wecom_client(pages)
    syncer = parts.syncer(open_kfid, client)
    await client.sync_msg(open_kfid, "0")  # token
    await parts.cursors.get(open_kfid)  # Redis connected
    # What the syncer host actor does once built (GC tuning), where this checkout has it;
    # QYWX_BENCH_SYNCER_GC=default measures without it.
    from qywx_ray.ingress import syncer_host

    tune_gc = getattr(syncer_host, "tune_gc", None)
    if tune_gc is not None and os.environ.get("QYWX_BENCH_SYNCER_GC") != "default":
        tune_gc()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu0, t0 = cpu_s(), time.perf_counter()
    result = await syncer.pull_once()
    elapsed, cpu = time.perf_counter() - t0, cpu_s() - cpu0
    cursor = await parts.cursors.get(open_kfid)
    await client.aclose()
    await parts.aclose()
    return {
        "open_kfid": open_kfid,
        "status": result.status,
        "messages": result.messages,
        "produced": result.produced,
        "spooled": result.spooled,
        "pages": result.pages,
        "cursor_ok": cursor == str(len(pages)),
        "elapsed_s": round(elapsed, 3),
        "msg_s": round(result.produced / elapsed, 1),
        "cpu_us_per_msg": round(cpu / max(result.messages, 1) * 1e6, 2),
    }


def run_hosts(svc: Any, kfids: list[str], messages: int, tag: str) -> list[dict[str, Any]]:
    """Start one host process per open_kfid, release them together, collect their reports."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for kfid in kfids:
            cmd = [
                sys.executable,
                "-m",
                "bench.bench_syncer",
                "--host",
                kfid,
                "--messages",
                str(messages),
            ]
            cmd += ["--tag", f"{tag}h{len(procs)}"]
            p = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=os.environ,
            )
            assert p.stdin is not None
            where = {
                "bootstrap": svc.bootstrap_servers,
                "redis_url": svc.redis_url,
                "topic": svc.settings.kafka.main_topic.name,
            }
            p.stdin.write(json.dumps(where) + "\n")
            p.stdin.flush()
            procs.append(p)
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"syncer host did not start: {line!r}")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        return reports
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


def two_host_kfids(prefix: str) -> list[str]:
    """Two open_kfids that the Ray deployment (2 syncer hosts) places on different hosts."""
    from qywx_ray.ingress.syncer_host import syncer_host_index

    chosen: dict[int, str] = {}
    for i in range(100):
        kfid = f"wk{prefix}Account{i}"
        chosen.setdefault(syncer_host_index(kfid, 2), kfid)
        if len(chosen) == 2:
            break
    return [chosen[0], chosen[1]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int, default=None, help="per account (50k; quick 10k)")
    ap.add_argument("--host", default="", help=argparse.SUPPRESS)  # child: one syncer host
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    ap.add_argument("--only", choices=["path_cpu", "one_account", "two_accounts"], default=None)
    ap.add_argument(
        "--wecom-rtt-ms",
        type=float,
        default=None,
        help="delay of each sync_msg answer, as from a remote WeCom (default 0: in process)",
    )
    args = ap.parse_args(argv)
    if args.wecom_rtt_ms is not None:
        os.environ[RTT_ENV] = str(args.wecom_rtt_ms)
    if args.quick:
        os.environ["QYWX_BENCH_QUICK"] = "1"
    messages = args.messages or (10_000 if quick_mode() else 50_000)
    if args.host:
        settings_json = sys.stdin.readline()
        report = asyncio.run(host_run(settings_json, args.host, messages, args.tag))
        print(json.dumps(report), flush=True)
        return 0

    runs = default_runs(3)
    dims = {"stage": "produce", "page": PAGE, "users": USERS, "record_size": 1024}
    if wecom_rtt_ms():
        dims["wecom_rtt_ms"] = wecom_rtt_ms()
    if args.only in (None, "path_cpu"):
        pages = make_pages("wkBench", min(messages, 20_000), "p")
        values = []
        for run in range(runs):
            us = asyncio.run(path_cpu_once(pages))
            values.append(us)
            emit(
                bench="syncer",
                case="path_cpu",
                metric="cpu_per_msg",
                value=round(us, 2),
                unit="us",
                run=run,
                **dims,
            )
        emit(
            bench="syncer",
            case="path_cpu",
            metric="cpu_per_msg_median",
            kind="summary",  # the report takes its own medians of the runs
            value=round(median(values), 2),
            unit="us",
            run=-1,
            **dims,
            extra={"min": round(min(values), 2), "max": round(max(values), 2)},
        )
    if args.only == "path_cpu":
        return 0
    from qywx_ray.ingress.syncer_host import syncer_host_index

    with bench_services() as svc:
        # A fresh broker's JVM compiles its hot paths in the first seconds under load: one
        # recorded warm-up pass first, so that a warm broker (like a production one) is measured.
        log("bench: syncer warm-up (recorded, not measured)")
        warm = run_hosts(svc, two_host_kfids("warm"), messages, "warm")
        emit(
            bench="syncer",
            case="warmup",
            metric="throughput",
            value=round(sum(r["produced"] for r in warm) / max(r["elapsed_s"] for r in warm), 1),
            unit="msg/s",
            run=-1,
            warmup=True,
            **dims,
        )
        cases = [("one_account", 1), ("two_accounts", 2)]
        results: dict[str, list[float]] = {}
        for case, accounts in cases:
            if args.only not in (None, case):
                continue
            for run in range(runs):
                tag = f"r{run}{case[:3]}"
                kfids = two_host_kfids(tag)[:accounts]
                log(f"bench: syncer {case} run {run}")
                reports = run_hosts(svc, kfids, messages, tag)
                total = sum(r["produced"] for r in reports)
                wall = max(r["elapsed_s"] for r in reports)
                lost = sum(r["messages"] - r["produced"] - r["spooled"] for r in reports)
                ok = all(r["cursor_ok"] and r["spooled"] == 0 for r in reports) and lost == 0
                value = total / wall
                results.setdefault(case, []).append(value)
                emit(
                    bench="syncer",
                    case=case,
                    metric="throughput",
                    value=round(value, 1),
                    unit="msg/s",
                    run=run,
                    accounts=accounts,
                    **dims,
                    extra={
                        "hosts": reports,
                        "host_index": [syncer_host_index(k, 2) for k in kfids],
                        "all_acked_cursor_committed": ok,
                        "lost": lost,
                    },
                )
                cpu = median([r["cpu_us_per_msg"] for r in reports])
                emit(
                    bench="syncer",
                    case=case,
                    metric="host_cpu_per_msg",
                    value=cpu,
                    unit="us",
                    run=run,
                    accounts=accounts,
                    **dims,
                )
        for case, values in results.items():
            emit(
                bench="syncer",
                case=case,
                metric="throughput_median",
                kind="summary",  # the report takes its own medians of the runs
                value=round(median(values), 1),
                unit="msg/s",
                run=-1,
                **dims,
                extra={"min": round(min(values), 1), "max": round(max(values), 1)},
            )
        if len(results) == 2:
            ratio = median(results["two_accounts"]) / median(results["one_account"])
            emit(
                bench="syncer",
                case="two_accounts",
                metric="scaling_vs_one",
                value=round(ratio, 2),
                unit="x",
                run=-1,
                **dims,
                extra={"syncer_hosts": 2},
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
