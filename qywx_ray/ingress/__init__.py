"""Ingress: the WeCom callback path, from the HTTP request to a pull request.

app (the FastAPI app and its Serve deployment) -> shedding (answers 200 without
decrypting while overloaded) -> callback (verify, decrypt, replay-check) -> dispatch
(coalesces open_kfids into pull requests) -> syncer_host (the named actors that own the
open_kfids by hash and run ingest's KfSyncers and spool replayer for them). The callback
never waits on Kafka, WeCom or a pull. The dependency runs one way: ingress uses ingest,
ingest never imports ingress (tests/unit/test_package_boundaries.py). Import from the
submodules: this package file stays empty so that loading settings never pulls fastapi in.
"""
