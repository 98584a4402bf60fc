"""Protection: rate limiting and blocks (Redis), per-user circuit breakers, user groups.

Decides only; never drops a message (denied messages go to the DLQ with a FailureReason).
Import from the modules (protect.ratelimit, protect.breaker, protect.groups,
protect.decision): this package is imported by qywx_ray.settings, so it stays light.
"""
