"""Redis memory per done-flag: what the dedup window costs at a given message rate.

Every processed message leaves a done-flag (`qywx:done:{msgid}`, TTL
`consume.dedup_ttl_s`, default one day) so a redelivered copy is skipped. The flags
live as long as the window, so Redis holds rate x window of them: capacity planning
needs the bytes per flag, which depend on Redis's own per-key overhead (dict entry,
expiry entry, allocator rounding), not only on the key's length.

One Redis (the pipeline's configuration: AOF on, no RDB snapshots; its own AOF rewrites
off, so none lands inside a measurement), flushed before each run, and the hosts' own
client and write path (`RedisDoneStore.mark_done`, batched as the hosts
batch it), msgids of 32 characters as the WeCom simulator makes them. Measured:
`used_memory` after minus before over the flags written (`bytes_per_done_flag`), and the
AOF's growth over the same flags (`aof_bytes_per_done_flag`: disk, and what an AOF
rewrite has to rewrite). Medians of 3 at the end; the memory a window needs at a few
rates goes to stderr.

  python -m bench.bench_redis_memory [--quick] [--flags 200000] [--msgid-len 32]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
from pathlib import Path

from bench.capacity import RATES, done_flags_gib
from bench.output import emit, log
from bench.runs import default_runs, quick_mode
from bench.stats import median

BATCH = 500  # a delivery batch's flags: one mark_done call, as a host's flush makes it


async def one_run(url: str, flags: int, msgid_len: int, ttl_s: int) -> dict[str, float]:
    from qywx_ray.consume.dedup import RedisDoneStore
    from qywx_ray.store.client import make_async_redis
    from qywx_ray.store.settings import RedisSettings

    client = make_async_redis(RedisSettings(url=url))
    try:
        await client.config_set("auto-aof-rewrite-percentage", 0)
        await client.flushall()
        store = RedisDoneStore(client, ttl_s)
        before = await client.info()
        for start in range(0, flags, BATCH):
            n = min(BATCH, flags - start)
            await store.mark_done([secrets.token_hex(msgid_len // 2) for _ in range(n)])
        after = await client.info()
        assert int(after["db0"]["keys"]) == flags, after["db0"]
        return {
            "bytes_per_done_flag": (after["used_memory"] - before["used_memory"]) / flags,
            "aof_bytes_per_done_flag": (after["aof_current_size"] - before["aof_current_size"])
            / flags,
        }
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    from bench.services import exit_on_sigterm
    from qywx_ray.consume.settings import ConsumeSettings
    from qywx_ray.devstack.redis import RedisServer

    exit_on_sigterm()  # the harness's timeout still stops our Redis
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--flags", type=int, default=None, help="done-flags per run (200k; quick 50k)")
    ap.add_argument("--msgid-len", type=int, default=32)
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args(argv)
    quick = args.quick or quick_mode()
    flags = args.flags or (50_000 if quick else 200_000)
    runs = args.runs or (1 if quick else default_runs(3))
    ttl_s = ConsumeSettings().dedup_ttl_s
    got: dict[str, list[float]] = {"bytes_per_done_flag": [], "aof_bytes_per_done_flag": []}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            for run in range(runs):
                values = asyncio.run(one_run(server.url, flags, args.msgid_len, ttl_s))
                for metric, value in values.items():
                    got[metric].append(value)
                    emit(
                        bench="redis_memory",
                        case="done_flags",
                        stage="redis",
                        metric=metric,
                        value=round(value, 1),
                        unit="bytes",
                        run=run,
                        flags=flags,
                        msgid_len=args.msgid_len,
                    )
        finally:
            server.stop()
    per_flag = median(got["bytes_per_done_flag"])
    log(f"redis_memory: {per_flag:.1f} bytes per done-flag (median of {runs})")
    for rate in RATES:  # the capacity model's rates, at this run's bytes per flag
        gib = done_flags_gib(rate, ttl_s, per_flag)
        log(f"redis_memory: {rate:,} msg/s x dedup_ttl_s {ttl_s:,}: {gib:,.1f} GiB of flags")
    return 0


if __name__ == "__main__":
    sys.exit(main())
