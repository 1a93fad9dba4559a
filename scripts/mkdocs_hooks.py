"""mkdocs hook (mkdocs.yml `hooks:`): a line ``<!-- results: PATH -->`` in a page becomes the results file PATH
(relative to the repository root) as it is, without its title and with its headings one level deeper, so that a
results file written by a benchmark or the study is shown under the page's own section headings, never copied."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = re.compile(r"^<!--\s*results:\s*(\S+)\s*-->$", re.M)


def results_markdown(path: str) -> str:
    """The file's text without its first-level title, every heading one level deeper (fenced code untouched)."""
    source = ROOT / path
    if not source.is_file():
        raise FileNotFoundError(f"<!-- results: {path} -->: {source} does not exist")
    lines, fenced = [], False
    for line in source.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("# "):
            continue  # the file's title: the page's section names it
        elif not fenced and line.startswith("#"):
            line = "#" + line
        lines.append(line)
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, **kwargs) -> str:
    return RESULTS.sub(lambda match: results_markdown(match.group(1)), markdown)
