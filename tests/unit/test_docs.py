"""The documentation stands alone and stays true (no services: runs in make unit).

- `mkdocs build --strict` passes: a broken link, a missing anchor or a page left out of the
  nav fails the build.
- Every shell block in README.md and docs/ says how it is tested (see tests/helpers/docs.py);
  one that cannot run here says why.
- Code shown in docs/handlers.md is copied verbatim from examples/faq_bot.py, which a test
  runs through the pipeline.
- No page points to a file outside this repository.
- README.md stays a landing page: at most 150 lines.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.docs import REPO, ShellBlock, doc_files, fenced_blocks, shell_blocks


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    # Not `-q`: quiet mode drops the warnings that --strict counts.
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("block", shell_blocks(), ids=lambda b: b.id)
def test_every_shell_block_says_how_it_is_tested(block: ShellBlock) -> None:
    assert block.kind in ("quick", "slow", "no"), "add <!-- run: quick|slow|no, why --> above it"
    if block.kind == "no":
        assert len(block.note) > 20, "say why this block cannot run here"


def test_handler_guide_code_is_the_tested_example() -> None:
    example = (REPO / "examples" / "faq_bot.py").read_text(encoding="utf-8")
    blocks = fenced_blocks(REPO / "docs" / "handlers.md", ("python",))
    copied = [b for b in blocks if "ctx.redis" in b.code or "class FaqState" in b.code]
    assert len(copied) == 2
    for block in copied:
        assert block.code in example, f"docs/handlers.md:{block.line} differs from the example"


def test_readme_stays_a_landing_page() -> None:
    """The README is the landing page (150 lines at most); operations, guarantees,
    runbooks and benchmark tables live in docs/."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move detail to docs/"


OUTSIDE = re.compile(r"\.\./shared|shared/(notes|seed)|design\.zh|(?<![-\w])seed \d|\bissue \d+")


def test_no_page_points_outside_the_repository() -> None:
    for path in [*doc_files(), *sorted((REPO / "examples").glob("*.py"))]:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not OUTSIDE.search(line), f"{path.relative_to(REPO)}:{n}: {line.strip()}"


# In code and its notes: section numbers of the outside design document ("seed" and a
# dotted number) and issue numbers; a simulator seed ("seed 17") is ours and may be named.
OUTSIDE_IN_CODE = re.compile(
    r"\.\./shared|shared/(notes|seed)|design\.zh|\bseed \d+\.\d|\bissues? ?#?\d+|issue-\d+"
)
CODE_DIRS = ("qywx_ray", "serve", "tests", "bench", "deploy", "config", "scripts", "examples")
CODE_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".lua", ".sh"}


def test_no_comment_points_outside_the_repository() -> None:
    """Comments, docstrings and notes too: a reader of this repository cannot follow an
    issue number or a section of a document that is not here."""
    results = REPO / "bench" / "results"  # measured output, kept as it was written
    for top in CODE_DIRS:
        for path in sorted((REPO / top).rglob("*")):
            if path.suffix not in CODE_SUFFIXES or results in path.parents:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                where = f"{path.relative_to(REPO)}:{n}: {line.strip()}"
                assert not OUTSIDE_IN_CODE.search(line), where
