"""qywx-ray: WeCom customer-service messages → Kafka → per-user ordered processing on Ray.

The public API a deployment and a handler author need, importable from the package root
(`from qywx_ray import HandlerContext, PermanentError`), so nobody has to know internal
module paths. Everything else is internal and may move.

Importing the package must stay cheap (a CLI, a Ray worker and a handler module all pay
for it): the names below are resolved lazily on first access, so `import qywx_ray`
imports neither pydantic nor Ray. `python -X importtime -c 'import qywx_ray'` checks it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and IDEs
    from qywx_ray.consume.handlers import (
        Handler,
        HandlerContext,
        PermanentError,
        envelope_handler,
    )
    from qywx_ray.consume.state import counts_messages, stateful
    from qywx_ray.envelope import Envelope
    from qywx_ray.errors import (
        ConfigError,
        CryptoError,
        EnvelopeError,
        InfraError,
        QywxError,
        WeComError,
    )
    from qywx_ray.settings import Settings, load_settings
    from qywx_ray.wecom.models import (
        EventMessage,
        FileMessage,
        ImageMessage,
        KfMessage,
        LinkMessage,
        LocationMessage,
        Origin,
        TextMessage,
        UnknownMessage,
        VideoMessage,
        VoiceMessage,
        parse_kf_message,
    )

    __version__: str

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # deployment: one typed settings object and its loader
    "Settings": "qywx_ray.settings",
    "load_settings": "qywx_ray.settings",
    # the record on Kafka
    "Envelope": "qywx_ray.envelope",
    # handler authors: the plugin signature, its context, how to say "never retry"
    "Handler": "qywx_ray.consume.handlers",
    "HandlerContext": "qywx_ray.consume.handlers",
    "PermanentError": "qywx_ray.consume.handlers",
    "envelope_handler": "qywx_ray.consume.handlers",
    # per-user state: `ctx.state`, committed exactly once with the done-flag
    "stateful": "qywx_ray.consume.state",
    "counts_messages": "qywx_ray.consume.state",
    # the exception tree (any other exception a handler raises is retried)
    "QywxError": "qywx_ray.errors",
    "ConfigError": "qywx_ray.errors",
    "InfraError": "qywx_ray.errors",
    "CryptoError": "qywx_ray.errors",
    "WeComError": "qywx_ray.errors",
    "EnvelopeError": "qywx_ray.errors",
    # typed WeCom messages a handler receives
    "KfMessage": "qywx_ray.wecom.models",
    "Origin": "qywx_ray.wecom.models",
    "TextMessage": "qywx_ray.wecom.models",
    "ImageMessage": "qywx_ray.wecom.models",
    "VoiceMessage": "qywx_ray.wecom.models",
    "VideoMessage": "qywx_ray.wecom.models",
    "FileMessage": "qywx_ray.wecom.models",
    "LocationMessage": "qywx_ray.wecom.models",
    "LinkMessage": "qywx_ray.wecom.models",
    "EventMessage": "qywx_ray.wecom.models",
    "UnknownMessage": "qywx_ray.wecom.models",
    "parse_kf_message": "qywx_ray.wecom.models",
}

__all__ = [
    "ConfigError",
    "CryptoError",
    "Envelope",
    "EnvelopeError",
    "EventMessage",
    "FileMessage",
    "Handler",
    "HandlerContext",
    "ImageMessage",
    "InfraError",
    "KfMessage",
    "LinkMessage",
    "LocationMessage",
    "Origin",
    "PermanentError",
    "QywxError",
    "Settings",
    "TextMessage",
    "UnknownMessage",
    "VideoMessage",
    "VoiceMessage",
    "WeComError",
    "__version__",
    "counts_messages",
    "envelope_handler",
    "load_settings",
    "parse_kf_message",
    "stateful",
]


def _version() -> str:
    """The installed distribution's version; a source tree that was never installed
    (PYTHONPATH only) still imports, with a version that says so."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qywx-ray")
    except PackageNotFoundError:
        return "0+unknown"


def __getattr__(name: str) -> Any:
    """Resolve a public name on first use and cache it in the module's namespace."""
    if name == "__version__":
        value: Any = _version()
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'qywx_ray' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, "__version__"])
