"""Dev tooling and test doubles, kept out of the product path.

wecomsim (the WeCom kf simulator), consume (helpers for tests and benchmarks that drive
the consume path through Kafka), sinks (a JSON dead-letter sink) and handlers (recording
test handlers named by spec, e.g. "qywx_ray.testing.handlers:recording_handler").
No product module imports this package (tests/unit/test_package_boundaries.py).
"""
