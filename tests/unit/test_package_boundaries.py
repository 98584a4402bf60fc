"""The library's import boundaries, read from the AST of every module in qywx_ray/.

- qywx_ray never imports `serve` (the top-level Serve entry imports the library, never the
  other way round: an installed wheel has no `serve` package).
- Product modules never import `qywx_ray.testing` (dev tooling and test doubles); only
  the testing package itself and the dev stack (qywx_ray/devstack/, which runs the
  simulator for `qywx-ray dev`) may.
- `qywx_ray.ingest` (the pull side: syncer, producer, spool, locks) never imports
  `qywx_ray.ingress` (the callback path and the syncer hosts built on ingest).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "qywx_ray"

# Modules allowed to import qywx_ray.testing: dev tooling, not the product path.
TESTING_USERS = ("qywx_ray.testing", "qywx_ray.devstack", "qywx_ray.demo")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, at any depth: the CLI
    imports lazily inside functions, which a walk of the top level alone would miss."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            # `from qywx_ray import testing` names the package in the alias
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(module: str, imports: list[tuple[int, str]]) -> list[str]:
    out = []
    for line, name in imports:
        if name == "serve" or name.startswith("serve."):
            out.append(f"{module}:{line} imports {name}")
        testing = name == "qywx_ray.testing" or name.startswith("qywx_ray.testing.")
        if testing and not module.startswith(TESTING_USERS):
            out.append(f"{module}:{line} imports {name}")
        if _within(module, "qywx_ray.ingest") and _within(name, "qywx_ray.ingress"):
            out.append(f"{module}:{line} imports {name}")
    return out


def test_the_library_keeps_its_import_boundaries() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        imports = _imports(path.read_text(encoding="utf-8"), module, path.name == "__init__.py")
        found.extend(_violations(module, imports))
    assert found == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("qywx_ray.cli", "def f():\n    from serve.app import build_app\n"),
        ("qywx_ray.demo", "import serve.app\n"),
        ("qywx_ray.consume.pipeline", "from qywx_ray import testing\n"),
        ("qywx_ray.consume.pipeline", "from qywx_ray.testing.consume import FakeSink\n"),
        ("qywx_ray.consume.pipeline", "from ..testing import consume\n"),
        ("qywx_ray.ingest.syncer", "from qywx_ray.ingress.syncer_host import get_syncer_host\n"),
        ("qywx_ray.ingest.spool", "from ..ingress import dispatch\n"),
    ],
)
def test_a_forbidden_import_is_found(module: str, source: str) -> None:
    assert _violations(module, _imports(source, module))


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("qywx_ray.devstack.simproc", "from qywx_ray.testing import wecomsim\n"),
        ("qywx_ray.testing.consume", "from qywx_ray.testing.sinks import RecordingSink\n"),
        ("qywx_ray.ingress.app", "from qywx_ray.ingress.dispatch import PullDispatcher\n"),
        ("qywx_ray.ingress.syncer_host", "from qywx_ray.ingest.syncer import KfSyncer\n"),
        ("qywx_ray.cli", "from ray import serve\n"),  # Ray's serve, not ours
    ],
)
def test_an_allowed_import_passes(module: str, source: str) -> None:
    assert _violations(module, _imports(source, module)) == []


@pytest.mark.parametrize(
    ("module", "test_only"),
    [
        ("qywx_ray.consume.handlers", ("recording_handler", "state_recording_handler")),
        ("qywx_ray.consume.sinks", ("KafkaDeadLetterSink", "json_sink")),
    ],
)
def test_nothing_test_only_is_left_in_consume(module: str, test_only: tuple[str, ...]) -> None:
    path = ROOT / (module.replace(".", "/") + ".py")
    defined = {
        node.name
        for node in ast.parse(path.read_text(encoding="utf-8")).body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    assert defined.isdisjoint(test_only)
    assert not (PACKAGE / "consume" / "testing.py").exists()
