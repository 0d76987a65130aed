"""The one way a benchmark writes its section of docs/benchmarks.md.

A section lies between a begin and an end marker of its own, names the script that writes it
(edits inside are overwritten), and opens with the command that produced it::

    <!-- step_bench:begin (written by bench/step_bench.py; edits here are overwritten) -->
    Command: `.venv/bin/python bench/step_bench.py --steps 30` (103 s, 2026-11-24)

    ...tables, plots...
    <!-- step_bench:end -->

Writing replaces that section and leaves the rest of the file (hand-written prose between the
sections included) alone; a section the file lacks yet is appended under its heading.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"


def command_line(script: str, argv: Sequence[str]) -> str:
    """How to run ``script`` (relative to the repository root) with ``argv`` again, as the docs show it."""
    return " ".join([".venv/bin/python", script, *(shlex.quote(a) for a in argv)])


@dataclass(frozen=True)
class DocSection:
    """One benchmark's section: ``name`` (``step_bench``, ``federated_bench:codecs``), the ``script``
    that writes it (``bench/step_bench.py``), and the ``heading`` it goes under when first appended."""

    name: str
    script: str
    heading: str = ""

    @property
    def begin(self) -> str:
        return f"<!-- {self.name}:begin (written by {self.script}; edits here are overwritten) -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.name}:end -->"

    def render(self, command: str, body: str, details: str = "") -> str:
        """The section: markers, ``Command: `command` details``, a blank line, then ``body``."""
        first = f"Command: `{command}`" + (f" {details}" if details else "")
        return "\n".join([self.begin, first, "", body.strip("\n"), self.end])

    def write(self, command: str, body: str, details: str = "", md: Path = BENCHMARKS_MD) -> str:
        """Render the section and put it into ``md``; returns what was written."""
        block = self.render(command, body, details)
        _replace_section(md, self.begin, self.end, block, self.heading)
        return block


def _replace_section(md: Path, begin: str, end: str, block: str, heading: str = "") -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) where the old section
    was, or append it under ``heading`` when the file has none yet."""
    text = md.read_text(encoding="utf-8") if md.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text, encoding="utf-8")
