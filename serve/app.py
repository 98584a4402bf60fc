"""The Ray Serve entry point, a builder and nothing else.

`serve run serve.app:build_app [config=path.yaml] [profile=production]`,
`serve run serve/config.yaml` / `serve deploy serve/config.yaml` name this builder too.
Settings come from the args, QYWX_PROFILE / QYWX_CONFIG and QYWX_* env, as everywhere else.
The app itself lives in the library (qywx_ray/ingress/app.py); nothing imports this module
but Serve.
"""

from __future__ import annotations

from typing import Any

from qywx_ray.ingress.app import deployment
from qywx_ray.settings import load_settings


def build_app(args: dict[str, str] | None = None) -> Any:
    """`serve run serve.app:build_app config=path.yaml` (an application builder)."""
    args = args or {}
    return deployment(load_settings(args.get("config"), profile=args.get("profile")))
