"""WeCom kf integration: crypto, callback router, API client, models, simulator.

Import from the submodules (`qywx_ray.wecom.client`, ...): this package file stays empty
so that loading `qywx_ray.wecom.settings` never pulls httpx/fastapi into every process.
"""
