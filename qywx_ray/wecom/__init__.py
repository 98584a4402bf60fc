"""WeCom kf integration: crypto, API client, models, errcodes, settings.

The callback router is in qywx_ray.ingress, the simulator in qywx_ray.testing.wecomsim.

Import from the submodules (`qywx_ray.wecom.client`, ...): this package file stays empty
so that loading `qywx_ray.wecom.settings` never pulls httpx/fastapi into every process.
"""
