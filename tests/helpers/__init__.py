"""Helpers shared by tests, one module per concern.

- `wait`: the one way to poll (bounded, never a fixed sleep);
- `host_fakes`: HostCore's in-memory fakes for unit tests;
- `kafka`: creating topics and the one topic reader (`read_records`);
- `consume`, `dlq`, `ingest`, `e2e`, `drills`: settings, fakes and the shape each stage's
  integration tests give the records they read;
- `ray`: the session's local Ray; `docs`: README/docs shell blocks; `callbacks`: signed
  WeCom callbacks.

Tests import from here, never from another test module or from conftest.
"""
