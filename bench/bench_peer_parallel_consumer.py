"""Peer benchmark: Confluent Parallel Consumer (ProcessingOrder.KEY) on the consume bench's load.

What a user would pick instead of this project for per-key ordered parallel processing,
run in the same `make bench` run, on the same broker, with the same backlog as
`bench_consume.py`'s hosted drains: 4 partitions, 10,000 users (keys), 5 messages each
(quick: 2), the very envelopes bench_consume produces (`make_envelopes`, ~220 bytes
each). Handlers: trivial, and a 5 ms sleep (Thread.sleep on one of PC's threads; ours
awaits asyncio.sleep). Max concurrency 64 and 128; ours runs `consume.num_hosts` ×
`consume.handler_concurrency` handlers at once (development profile: 2 × 64 = 128), so the
128 case is the like-for-like one and the report shows ours/peer there.

Commit mode: PERIODIC_CONSUMER_ASYNCHRONOUS, PC's default and what its README recommends
for at-least-once without transactions; enable.auto.commit=false as PC requires. After each
drain, PC is closed and the group's committed offsets are read back: every record must be
covered (`committed` == records), or the run is an error.

Also its published scenario, as published: 10,000 messages on 10,000 keys, one partition,
0-5 ms random work, concurrency 100 (README "illustrative example": 2.128 s ≈ 4,700 msg/s).

One JVM per topic runs every case and repeat (each with a fresh consumer group from the
earliest offset), after one unrecorded warm-up drain: a long-running consumer is warm.
Throughput = records / (first handler start → last handler end). Every line carries
`load1`; the machine is shared: quote medians.

    QYWX_BENCH_QUICK=1 QYWX_BENCH_BOOTSTRAP=127.0.0.1:19092 \\
      python -m bench.bench_peer_parallel_consumer
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from typing import Any

from bench.output import emit, log
from bench.peer_tools import (
    PUBLISHED,
    PeerError,
    PeerRun,
    ensure_peer,
    peer_command,
    peer_versions,
    run_peer,
    work_spec,
)
from bench.runs import default_runs, quick_mode
from bench.services import _delete_topics, bench_services, settings_for

BENCH = "peer_parallel_consumer"
PIPELINE = "parallel_consumer"
COMMIT_MODE = "PERIODIC_CONSUMER_ASYNCHRONOUS"


def make_backlog(svc: Any, tag: str, partitions: int, users: int, per_user: int) -> tuple[Any, int]:
    """A fresh topic holding bench_consume's envelopes (round-robin over users)."""
    from bench.bench_consume import make_envelopes
    from qywx_ray.testing.consume import ensure_topics, produce

    settings = settings_for(
        svc.bootstrap_servers,
        svc.redis_url,
        svc.workdir,
        overrides={"kafka": {"main_topic": {"partitions": partitions}}},
        tag=tag,
    )
    ensure_topics(settings)
    n = produce(settings, make_envelopes(tag, f"{tag}m", users, per_user))
    return settings, n


def ours_concurrency(svc: Any) -> dict[str, int]:
    """What bench_consume's hosted pipeline runs with: hosts × handlers per host."""
    c = svc.settings.consume
    return {
        "ours_num_hosts": c.num_hosts,
        "ours_handler_concurrency": c.handler_concurrency,
        "ours_concurrency": c.num_hosts * c.handler_concurrency,
    }


def emit_runs(
    runs: list[PeerRun], *, handler_of: dict[str, str], dims: dict[str, Any], record_size: int
) -> int:
    """One throughput line per good run, an error line per bad one; returns the bad count."""
    bad = 0
    for r in runs:
        handler = handler_of.get(r.case, r.case)
        case = f"{PIPELINE}_{handler}_c{r.concurrency}"
        extra = {
            "records": r.expected,
            "processed": r.processed,
            "elapsed_s": round(r.elapsed_s, 4),
            "committed": r.committed,
            "close_s": r.close_s,
            "order_violations": r.order_violations,
            "status": r.status,
            "commit_mode": r.commit_mode,
            "load1_at_drain_end": r.load1,
        }
        if not r.ok or not r.fully_committed or r.order_violations:
            bad += 1
            emit(
                kind="error",
                bench=BENCH,
                case=case,
                run=r.run,
                error=(
                    f"{r.status}: processed {r.processed}/{r.expected}, committed "
                    f"{r.committed}, order violations {r.order_violations}, paused "
                    f"partitions {r.paused_partitions}. {r.detail}"
                )[:500],
                extra=extra,
            )
            continue
        emit(
            bench=BENCH,
            case=case,
            stage="consume",
            metric="throughput",
            value=round(r.throughput, 1),
            unit="msg/s",
            run=r.run,
            pipeline=PIPELINE,
            handler=handler,
            concurrency=r.concurrency,
            record_size=record_size,
            **dims,
            extra=extra,
        )
    return bad


def main() -> int:
    quick = quick_mode()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=default_runs(3))
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--per-user", type=int, default=2 if quick else 5, help="as bench_consume")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--handlers", nargs="+", default=["trivial", "sleep_5ms"])
    ap.add_argument("--commit-mode", default=COMMIT_MODE)
    ap.add_argument(
        "--published",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run PC's published scenario (10,000 keys, 0-5 ms, concurrency 100)",
    )
    ap.add_argument("--stall-s", type=float, default=30.0, help="no progress this long = stalled")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="per drain")
    args = ap.parse_args()

    try:
        libs, classes = ensure_peer()
    except PeerError as exc:
        emit(kind="error", bench=BENCH, case="setup", run=0, error=str(exc)[:500])
        return 1
    versions = peer_versions()
    bad = 0
    with bench_services(redis=False, create_topics=False) as svc:
        topics: list[str] = []
        try:
            context = {
                "kind": "peer_context",
                "bench": BENCH,
                "commit_mode": args.commit_mode,
                "ordering": "KEY",
                **{f"{k}_version": v for k, v in versions.items()},
                **ours_concurrency(svc),
            }
            emit(**context)
            scenarios: list[dict[str, Any]] = [
                {
                    "name": "consume",
                    "partitions": args.partitions,
                    "users": args.users,
                    "per_user": args.per_user,
                    "cases": [
                        (h, c, work_spec(h)) for h in args.handlers for c in args.concurrency
                    ],
                    "repeat": args.runs,
                }
            ]
            if args.published:
                scenarios.append(
                    {
                        "name": "published",
                        "partitions": 1,
                        "users": int(PUBLISHED["keys"]),
                        "per_user": 1,
                        "cases": [
                            (
                                "random_0_5ms",
                                int(PUBLISHED["concurrency"]),
                                work_spec("random_0_5ms"),
                            )
                        ],
                        "repeat": args.runs,
                    }
                )
            for sc in scenarios:
                tag = f"peer{uuid.uuid4().hex[:6]}"
                log(f"peer bench: {sc['name']}: producing {sc['users']}x{sc['per_user']}")
                settings, n = make_backlog(svc, tag, sc["partitions"], sc["users"], sc["per_user"])
                topics += [settings.kafka.main_topic.name, settings.kafka.dlq_topic.name]
                from bench.bench_consume import make_envelopes

                record_size = len(make_envelopes(tag, f"{tag}m", 1, 1)[0].to_bytes())
                # Case names inside Java are unique per (handler, concurrency).
                java_cases = [(f"{h}-c{c}", c, w) for h, c, w in sc["cases"]]
                handler_of = {f"{h}-c{c}": h for h, c, _ in sc["cases"]}
                argv = peer_command(
                    libs,
                    classes,
                    bootstrap=svc.bootstrap_servers,
                    topic=settings.kafka.main_topic.name,
                    records=n,
                    cases=java_cases,
                    repeat=sc["repeat"],
                    warmup=1,
                    commit_mode=args.commit_mode,
                    stall_s=args.stall_s,
                    timeout_s=args.timeout_s,
                )
                drains = sc["repeat"] * len(java_cases) + 1
                log(
                    f"peer bench: {sc['name']}: {drains} drains of {n} records (load "
                    f"{os.getloadavg()[0]:.1f})"
                )
                runs, err_tail, code = run_peer(argv, timeout_s=drains * args.timeout_s + 120)
                dims = {
                    "partitions": sc["partitions"],
                    "users": sc["users"],
                    "scenario": sc["name"],
                }
                bad += emit_runs(runs, handler_of=handler_of, dims=dims, record_size=record_size)
                if code != 0 or len(runs) < sc["repeat"] * len(java_cases):
                    bad += 1
                    emit(
                        kind="error",
                        bench=BENCH,
                        case=sc["name"],
                        run=0,
                        error=f"PeerBench exit {code}, {len(runs)} results: {err_tail[-400:]}",
                    )
        finally:
            if topics:
                _delete_topics(svc.settings.kafka, topics)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
