"""Ingest: kf/sync_msg pages into Kafka, per-user order kept, nothing lost.

syncer (KfSyncer, one per open_kfid) -> producer (confirmed-by-batch) | spool (Redis,
per user, replayed in order) ; locks (Redis, fenced) ; cursor (fenced commit) ; breaker.
`build_ingest(settings)` assembles them.
"""
