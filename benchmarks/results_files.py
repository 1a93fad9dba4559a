"""Where a benchmark writes its results, and the rule that a run never replaces another's unasked.

Every script names its results ``<out>/<stem>.json`` and ``.md`` once, from what it knows before measuring (machine,
threads, date, ``--tag``), refuses before any work when a file of that name exists, and writes both files
atomically when done (each appears whole or not at all). ``--overwrite`` replaces them on purpose.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SUFFIXES = (".json", ".md")


def add_arguments(parser: argparse.ArgumentParser, tag_help: str = "") -> None:
    """--out, --tag and --overwrite, the same in every benchmark."""
    parser.add_argument("--out", default=str(RESULTS), help="folder for the results files (default: %(default)s)")
    parser.add_argument(
        "--tag",
        default="",
        help=tag_help or "appended to the results' file names, to keep runs of one machine and day apart",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace results files of the same name (refused without it)"
    )


def tagged(stem: str, tag: str) -> str:
    return f"{stem}-{tag}" if tag else stem


def refuse_existing(out: str | Path, stem: str, overwrite: bool, suffixes=SUFFIXES) -> None:
    """Stop, naming the files and the ways out, when results of this name exist and --overwrite was not given."""
    if overwrite:
        return
    existing = [str(Path(out) / f"{stem}{suffix}") for suffix in suffixes if (Path(out) / f"{stem}{suffix}").exists()]
    if existing:
        one = len(existing) == 1
        raise SystemExit(
            f"{' and '.join(existing)} already exist{'s' if one else ''}: this run would replace "
            f"{'it' if one else 'them'}. Pass --tag NAME to name this run's files apart, --out DIR to write them elsewhere, or "
            "--overwrite to replace them."
        )


def write(out: str | Path, stem: str, texts: dict[str, str], overwrite: bool) -> dict[str, Path]:
    """Write ``{suffix: text}`` as ``<out>/<stem><suffix>``, each through a temporary file renamed into place, after
    checking again that none exists (another run may have written them since this one started)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    refuse_existing(out, stem, overwrite, tuple(texts))
    written = {}
    for suffix, text in texts.items():
        path = out / f"{stem}{suffix}"
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(text)
        os.replace(partial, path)
        written[suffix] = path
    return written
