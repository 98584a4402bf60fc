"""`qywx-ray dlq …` subcommands: stats, list, retry, batch-retry, purge, export, replay-emergency.

Argparse only; every action is DLQManager or replay_emergency. Never changes anything
without an explicit subcommand; output is JSON (or the export stream) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from qywx_ray.settings import Settings, load_settings


def add_subcommands(parser: argparse.ArgumentParser) -> None:
    """Attach the dlq subcommands to `parser` (the lead mounts it as `qywx-ray dlq`)."""
    sub = parser.add_subparsers(dest="dlq_command", required=True)
    sub.add_parser("stats", help="counts by reason and status, queue sizes, emergency backlog")

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--user")
        p.add_argument("--reason")
        p.add_argument("--status", choices=["scheduled", "retried", "manual_review"])
        p.add_argument("--limit", type=int, default=100)

    filters(sub.add_parser("list", help="list dead letters"))
    retry = sub.add_parser("retry", help="retry one dead letter now")
    retry.add_argument("message_id")
    filters(sub.add_parser("batch-retry", help="retry every dead letter matching the filter"))
    sub.add_parser("purge", help="forget letters whose TTL has passed")
    export = sub.add_parser("export", help="export dead letters")
    filters(export)
    export.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    sub.add_parser("replay-emergency", help="re-publish emergency-file entries (idempotent)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from qywx_ray.dlq.manage import DLQFilter, DLQManager
    from qywx_ray.dlq.producer import replay_emergency
    from qywx_ray.store.client import make_redis

    command = args.dlq_command
    if command == "replay-emergency":
        report = replay_emergency(settings)
        print(json.dumps(report.__dict__, indent=2))
        return 0 if report.failed == 0 else 1
    manager = DLQManager(settings, make_redis(settings.redis))

    def flt() -> DLQFilter:
        return DLQFilter(
            user=args.user, reason=args.reason, status=args.status, limit=max(1, args.limit)
        )

    if command == "stats":
        print(json.dumps(manager.stats(), indent=2))
    elif command == "list":
        print(json.dumps(manager.list(flt()), indent=2, ensure_ascii=False))
    elif command == "retry":
        result = manager.retry(args.message_id, actor="cli")
        print(result.model_dump_json())
        return 0 if result.result == "scheduled" else 1
    elif command == "batch-retry":
        print(json.dumps({"scheduled": manager.batch_retry(flt(), actor="cli")}))
    elif command == "purge":
        print(json.dumps({"purged": manager.purge_expired(actor="cli")}))
    elif command == "export":
        for chunk in manager.export(flt(), args.format):
            sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None, settings: Settings | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qywx-ray dlq")
    parser.add_argument("--config", help="YAML config file (default: config/<profile>.yaml)")
    add_subcommands(parser)
    args = parser.parse_args(argv)
    return run(args, settings or load_settings(args.config))


if __name__ == "__main__":
    raise SystemExit(main())
