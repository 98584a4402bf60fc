"""Shell blocks in README.md and docs/*.md, with the marker that says how each is tested.

Every fenced shell block is preceded by one of
`<!-- run: quick -->` (tests/integration/test_readme_commands.py, in make test),
`<!-- run: slow ... -->` (the same test under make drills) or
`<!-- run: no, <why it cannot run here> -->`,
so a documented command is either run or says why it cannot be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHELL_LANGS = ("bash", "sh", "shell", "console")
_MARKER = re.compile(r"^<!-- run: (quick|slow|no)\b(.*?)-->\s*$")


@dataclass(frozen=True)
class ShellBlock:
    path: Path
    line: int  # 1-based line of the opening fence
    kind: str  # quick | slow | no | "" (no marker)
    note: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def fenced_blocks(path: Path, langs: tuple[str, ...]) -> list[ShellBlock]:
    """Fenced blocks of the given languages, each with the marker line above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[ShellBlock] = []
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            lang = fence[3:].strip()
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if lang in langs:
                above = lines[i - 1].strip() if i > 0 else ""
                m = _MARKER.match(above)
                kind, note = (m.group(1), m.group(2).strip(" ,(")) if m else ("", "")
                code = "\n".join(lines[i + 1 : end])
                blocks.append(ShellBlock(path, i + 1, kind, note, code))
            i = end + 1
            continue
        i += 1
    return blocks


def shell_blocks() -> list[ShellBlock]:
    return [b for p in doc_files() for b in fenced_blocks(p, SHELL_LANGS)]
