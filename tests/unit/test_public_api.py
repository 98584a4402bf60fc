"""The package front door: every public name resolves, and `import qywx_ray` stays light.

A handler author imports from `qywx_ray` only; if a module moves, the re-export must move
with it, and this test says which name broke. The import must not pull in Ray or pydantic
(a CLI, every Ray worker and every handler module pay for it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import qywx_ray


def test_every_public_name_resolves() -> None:
    for name in qywx_ray.__all__:
        assert getattr(qywx_ray, name) is not None, name
    assert set(qywx_ray.__all__) == {"__version__", *qywx_ray._EXPORTS}


def test_version_is_a_string() -> None:
    assert isinstance(qywx_ray.__version__, str)
    assert qywx_ray.__version__


def test_handler_author_names_are_the_real_classes() -> None:
    from qywx_ray.consume.handlers import HandlerContext, PermanentError
    from qywx_ray.errors import QywxError

    assert qywx_ray.HandlerContext is HandlerContext
    assert qywx_ray.PermanentError is PermanentError
    assert issubclass(qywx_ray.PermanentError, QywxError)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        _ = qywx_ray.NoSuchThing  # type: ignore[attr-defined]


def test_import_pulls_in_neither_ray_nor_pydantic() -> None:
    code = (
        "import sys, qywx_ray; "
        "print(sorted(m for m in ('ray', 'pydantic', 'redis', 'confluent_kafka') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
