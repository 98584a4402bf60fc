"""Consume: Kafka -> per-user ordered processing on Ray, committed only when safe.

Laid out as a message flows, pure decisions apart from the shells that await:
- the partition consumer: tracker (pure: assignment, in flight, watermarks; watermark is
  the commit math) · partition_consumer (the Kafka + Ray shell) · placement (dedicated
  actors' owners);
- a host's mailboxes: host_rules and mailbox_machine (pure: intake, placement, park /
  drain / finish, lifecycle) · user_actor (HostCore: handler slots and a head's run) ·
  host_intake (a delivery batch to placed work) · host_lot (the parking lot's await
  sequences) · host_state and state (per-user state) · host_report (completions,
  counters) · host_io (outside calls and their failure policies) · batch_reads and dedup
  (Redis: the one-call read, done-flags);
- handlers, deadlines and handler_threads (the plugin point, its timeouts and threads) ·
  hosts (Ray shells: hosted / dedicated) · pipeline (start/stop) · introspect (views);
- mailbox (the per-user data) · types (the seams: Protocols, records, reasons) ·
  settings · sinks (configured hooks).
"""
