"""`qywx-ray` command line: topics, the local dev stack, the demo, operations.

Exit codes: 0 ok, 2 configuration error (nothing was changed), 3 infrastructure
unreachable, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qywx_ray.errors import ConfigError, InfraError, QywxError
from qywx_ray.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    """Every command loads here; the production profile refuses default secrets (exit 2)."""
    return load_settings(args.config, profile=args.profile)


def cmd_topics_ensure(args: argparse.Namespace) -> int:
    from qywx_ray.kafka.topics import ensure_topics

    settings = _settings(args)
    for report in ensure_topics(settings.kafka, timeout_s=args.timeout_s):
        print(
            f"{report.action:8} {report.name}: partitions={report.partitions} "
            f"rf={report.replication_factor} "
            + " ".join(f"{k}={v}" for k, v in sorted(report.configs.items()))
        )
    return 0


def _stack(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from qywx_ray.devstack.local import LocalStack

    settings = _settings(args)
    return LocalStack(Path(settings.data_dir) / "dev", brokers=args.brokers)


def cmd_dev_up(args: argparse.Namespace) -> int:
    stack = _stack(args)
    started = stack.up()
    for line in started or ["already running"]:
        print(f"dev: {line}")
    print(f"dev: QYWX_KAFKA__BOOTSTRAP_SERVERS={stack.bootstrap()}")
    print(f"dev: QYWX_REDIS__URL={stack.redis_url()}")
    if args.ray_nodes:
        address = stack.ray_up(args.ray_nodes)
        print(f"dev: RAY_ADDRESS={address}  (placement: QYWX_PLACEMENT__STRATEGY=SPREAD)")
    return 0


def cmd_dev_down(args: argparse.Namespace) -> int:
    stopped = _stack(args).down()
    print("dev: stopped " + (", ".join(stopped) if stopped else "nothing (none running)"))
    return 0


def cmd_dev_status(args: argparse.Namespace) -> int:
    print(json.dumps(_stack(args).status(), indent=2))
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    from qywx_ray.dlq.cli import run

    return run(args, _settings(args))


def cmd_users(args: argparse.Namespace) -> int:
    import ray

    from qywx_ray.consume.introspect import users_command

    settings = _settings(args)
    ray.init(address=args.address, namespace=settings.ray_namespace, log_to_driver=False)
    print(users_command(settings, as_json=args.json, limit=args.limit))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from qywx_ray.doctor import main_doctor

    # The one command that loads default secrets in production: to report them (exit 1).
    settings = load_settings(args.config, profile=args.profile, allow_default_secrets=True)
    return main_doctor(settings, ray_address=args.ray_address)


def cmd_start(args: argparse.Namespace) -> int:
    """Start (or reuse: actors are named) the pipeline on a running Ray cluster."""
    import ray

    from qywx_ray.consume.pipeline import start_consumers
    from qywx_ray.dlq.actor import start_recovery_actor

    settings = _settings(args)
    ray.init(address=args.address, namespace=settings.ray_namespace, log_to_driver=False)
    pipeline = start_consumers(settings)
    start_recovery_actor(settings)
    print(
        f"consume: {len(pipeline.consumers)} consumers, {len(pipeline.hosts)} hosts "
        f"({settings.consume.mode}); DLQ recovery actor running"
    )
    if not args.no_serve:
        from ray import serve

        from qywx_ray.ingress.app import deployment

        serve.start(http_options={"host": args.http_host, "port": args.http_port})
        serve.run(deployment(settings), name=SERVE_APP, route_prefix="/")
        print(f"ingress: http://{args.http_host}:{args.http_port}/wecom/callback")
    if not args.foreground:
        return 0
    # Supervised (systemd, a container): stay up until SIGTERM/SIGINT, then stop in order.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print("running; SIGTERM or Ctrl-C drains and stops everything started here", flush=True)
    while not stop.wait(1.0):
        pass
    print("stopping ...", flush=True)
    ordered_stop(settings, args.stop_timeout_s, serve_app=None if args.no_serve else SERVE_APP)
    return 0


SERVE_APP = "qywx"


def _bounded(ref: Any, timeout_s: float, what: str) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - dead already, or over its bound: the kill below ends it
        print(f"{what}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return None


def ordered_stop(settings: Settings, timeout_s: float, serve_app: str | None = SERVE_APP) -> int:
    """Graceful stop of everything `start` starts, upstream first; each step bounded.

    1. ingress: Serve stops routing, answers in-flight callbacks, sends held pull requests;
    2. syncer hosts: finish or cancel pulls (cursor only ever at an acked page), release
       their locks, flush the producer;
    3. consumers: drain in-flight messages, commit the watermark, close (hosts then end);
    4. DLQ recovery: finish the batch, commit, hand leased retries back to the delay queue;
    5. every named actor left in the namespace is killed.
    Returns the number of actors killed at the end. Bound: about 4 x timeout_s.
    """
    import ray

    from qywx_ray.consume.pipeline import find_pipeline, stop_consumers
    from qywx_ray.devstack.procs import kill_named_actors
    from qywx_ray.ingress.syncer_host import syncer_host_name

    ns = settings.ray_namespace
    if serve_app:
        try:
            from ray import serve

            serve.delete(serve_app)
            print("ingress: stopped", flush=True)
        except Exception as exc:  # noqa: BLE001 - not running is fine
            print(f"ingress: {exc}", flush=True)
    refs: list[Any] = []
    for i in range(settings.ingest.num_syncer_hosts):
        try:
            host = ray.get_actor(syncer_host_name(i), namespace=ns)
        except ValueError:
            continue  # never created (no callback reached this host)
        refs.append(host.shutdown.remote(timeout_s / 2))
    for ref in refs:
        left = _bounded(ref, timeout_s, "syncer host")
        print(f"syncer host: stopped, {left} undelivered", flush=True)
    try:
        pipeline = find_pipeline(settings)
    except ValueError as exc:
        print(f"consume: {exc}", flush=True)
    else:
        stop_consumers(pipeline, timeout_s=timeout_s)
        print("consume: drained and committed", flush=True)
    try:
        recovery = ray.get_actor(settings.dlq.recovery_actor_name, namespace=ns)
    except ValueError:
        pass
    else:
        released = _bounded(recovery.stop.remote(timeout_s / 2), timeout_s, "dlq recovery")
        print(f"dlq recovery: stopped, {released} leases handed back", flush=True)
        ray.kill(recovery, no_restart=True)
    return kill_named_actors(ns)


def cmd_stop(args: argparse.Namespace) -> int:
    """Drain and stop the pipeline in order (see ordered_stop); named actors end."""
    import ray

    settings = _settings(args)
    ray.init(address=args.address, namespace=settings.ray_namespace, log_to_driver=False)
    killed = ordered_stop(settings, args.timeout_s)
    print(f"stopped; {killed} named actors removed")
    return 0


def cmd_admin_serve(args: argparse.Namespace) -> int:
    """The admin API on its own listener, loopback by default (reach it by SSH tunnel):
    the production ingress does not mount it (admin.enabled is off). Runs until SIGTERM or
    Ctrl-C."""
    import uvicorn

    from qywx_ray.admin.app import create_admin_app

    settings = _settings(args)
    users = bool(args.address)
    if users:
        import ray

        ray.init(address=args.address, namespace=settings.ray_namespace, log_to_driver=False)
    print(
        f"admin: http://{args.host}:{args.port}/admin/ "
        f"(bearer token from admin.token){'' if users else '; /admin/users off (no Ray)'}",
        flush=True,
    )
    uvicorn.run(
        create_admin_app(settings, users=users),
        host=args.host,
        port=args.port,
        log_level="warning",
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qywx_ray.demo import run_demo

    return run_demo(_settings(args), args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qywx-ray", description=__doc__)
    parser.add_argument("--config", help="YAML config file (default: config/<profile>.yaml)")
    parser.add_argument("--profile", help="development or production (env QYWX_PROFILE)")
    sub = parser.add_subparsers(dest="command", required=True)

    topics = sub.add_parser("topics", help="Kafka topics").add_subparsers(dest="sub", required=True)
    ensure = topics.add_parser("ensure", help="create or validate main and DLQ topics")
    ensure.add_argument("--timeout-s", type=float, default=30.0)
    ensure.set_defaults(func=cmd_topics_ensure)

    dev = sub.add_parser("dev", help="local Kafka + Redis for development")
    dev.add_argument("--brokers", type=int, choices=(1, 3), default=1)
    dev.add_argument(
        "--ray-nodes",
        type=int,
        default=0,
        help="also start a local Ray cluster: a head plus N-1 worker nodes (1 CPU each)",
    )
    dev_sub = dev.add_subparsers(dest="sub", required=True)
    dev_up = dev_sub.add_parser("up")
    # Also after `up` (`qywx-ray dev up --ray-nodes 3`); SUPPRESS keeps the value given
    # before it.
    dev_up.add_argument("--ray-nodes", type=int, default=argparse.SUPPRESS)
    dev_up.set_defaults(func=cmd_dev_up)
    dev_sub.add_parser("down").set_defaults(func=cmd_dev_down)
    dev_sub.add_parser("status").set_defaults(func=cmd_dev_status)

    from qywx_ray.dlq.cli import add_subcommands as add_dlq

    dlq = sub.add_parser("dlq", help="dead letters: stats, list, retry, purge, export, ...")
    add_dlq(dlq)
    dlq.set_defaults(func=cmd_dlq)

    users = sub.add_parser("users", help="live user actors (needs a running Ray cluster)")
    users.add_argument("--address", default="auto")
    users.add_argument("--json", action="store_true")
    users.add_argument("--limit", type=int, default=100)
    users.set_defaults(func=cmd_users)

    doctor = sub.add_parser("doctor", help="check brokers, topics, Redis, Ray, credentials")
    doctor.add_argument("--ray-address", default="auto", help="'' to skip the Ray check")
    doctor.set_defaults(func=cmd_doctor)

    start = sub.add_parser("start", help="start consumers, DLQ recovery and the ingress on Ray")
    start.add_argument("--address", default="auto")
    start.add_argument("--no-serve", action="store_true", help="consumers and DLQ only")
    start.add_argument("--http-host", default="0.0.0.0")
    start.add_argument("--http-port", type=int, default=8000)
    start.add_argument(
        "--foreground",
        action="store_true",
        help="stay up; on SIGTERM/SIGINT drain and stop everything started (exit 0)",
    )
    start.add_argument("--stop-timeout-s", type=float, default=20.0, help="per shutdown step")
    start.set_defaults(func=cmd_start)
    stop = sub.add_parser("stop", help="drain and stop what `start` started")
    stop.add_argument("--address", default="auto")
    stop.add_argument("--timeout-s", type=float, default=60.0)
    stop.set_defaults(func=cmd_stop)

    admin = sub.add_parser("admin", help="the admin API").add_subparsers(dest="sub", required=True)
    admin_serve = admin.add_parser("serve", help="admin API alone on a loopback port")
    admin_serve.add_argument("--host", default="127.0.0.1", help="keep it loopback or private")
    admin_serve.add_argument("--port", type=int, default=8001)
    admin_serve.add_argument(
        "--address", default="auto", help="Ray cluster for /admin/users; '' leaves it out"
    )
    admin_serve.set_defaults(func=cmd_admin_serve)

    demo = sub.add_parser("demo", help="run the whole pipeline locally with a live view")
    demo.add_argument("--users", type=int, default=200)
    demo.add_argument("--rate-per-min", type=float, default=6.0)
    demo.add_argument("--duration-s", type=float, default=0.0, help="0: until Ctrl-C")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"qywx-ray: configuration error: {exc}", file=sys.stderr)
        return 2
    except InfraError as exc:
        print(f"qywx-ray: infrastructure error: {exc}", file=sys.stderr)
        return 3
    except QywxError as exc:
        print(f"qywx-ray: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
