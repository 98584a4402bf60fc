"""Consume: Kafka -> per-user ordered processing on Ray, committed only when safe.

watermark (pure commit math) · user_actor (pure asyncio mailboxes + HostCore) · dedup
(done-flags) · handlers (plugin point) · hosts (Ray shells: hosted / dedicated) ·
partition_consumer (Kafka + Ray glue) · pipeline (start/stop) · introspect (views).
"""
