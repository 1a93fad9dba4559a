"""scripts/make_builtin_corpus.py never rebuilds the shipped corpus, tokenizer and tasks unasked (another Python's
docstrings would change them): --help only prints, and an existing output folder needs --overwrite."""

import subprocess
import sys
from pathlib import Path

from helpers import snapshot

from hf_sparse_ift.resources import builtin_dir

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_builtin_corpus.py"


def test_help_and_an_existing_output_leave_the_shipped_files_alone(tmp_path):
    before = snapshot(builtin_dir())
    shown = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--overwrite" in shown.stdout and "--output-dir" in shown.stdout
    refused = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "already holds files" in refused.stderr and "--overwrite" in refused.stderr
    (tmp_path / "keep.txt").write_text("earlier")
    elsewhere = subprocess.run(
        [sys.executable, SCRIPT, "--output-dir", tmp_path], capture_output=True, text=True, timeout=60
    )
    assert elsewhere.returncode == 2 and str(tmp_path) in elsewhere.stderr
    assert snapshot(builtin_dir()) == before and snapshot(tmp_path) == {"keep.txt": b"earlier"}
