"""Ingress: the WeCom callback path, from the HTTP request to a pull request.

app (the FastAPI app and its Serve deployment) -> shedding (answers 200 without
decrypting while overloaded) -> callback (verify, decrypt, replay-check) -> dispatch
(coalesces open_kfids into pull requests for the syncer hosts, ingest/syncer_host.py).
The callback never waits on Kafka, WeCom or a pull. Import from the submodules: this
package file stays empty so that loading settings never pulls fastapi in.
"""
