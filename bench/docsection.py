"""Replace one generated section of docs/benchmarks.md, leaving the rest of the file alone."""

from __future__ import annotations

from pathlib import Path


def replace_section(md: Path, begin: str, end: str, block: str, heading: str = "") -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) where the old section
    was, or append it under ``heading`` when the file has none yet."""
    text = md.read_text(encoding="utf-8") if md.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    md.write_text(text, encoding="utf-8")
