"""The command line itself: help and argument errors without torch, options and overrides in any order, and which
errors are one line (the package's refusals) and which keep their traceback (bugs)."""

import subprocess
import sys

import pytest

from hf_sparse_ift.cli import build_parser, main
from hf_sparse_ift.errors import InputNotFoundError, OutputExistsError, UsageError

_, COMMANDS = build_parser()

# Run in a fresh interpreter: the test process has torch loaded already.
PROBE = """
import sys
from hf_sparse_ift.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("HEAVY" if heavy else "LIGHT", heavy, code)
"""


def _probe(*argv: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    return done.stdout.strip().splitlines()[-1], done.stderr


@pytest.mark.parametrize(
    "argv",
    [["--help"], *[[command, "--help"] for command in sorted(COMMANDS)], ["pretrain", "--bogus"], ["evaluate"], []],
    ids=lambda argv: " ".join(argv) or "no-command",
)
def test_help_and_argument_errors_import_neither_torch_nor_transformers(argv):
    verdict, stderr = _probe(*argv)
    assert verdict.startswith("LIGHT"), (verdict, stderr[-2000:])


def test_importing_the_package_is_light_and_still_registers_the_auto_classes():
    script = (
        "import sys, hf_sparse_ift\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "config = AutoConfig.for_model('sparse_wide_gpt', dense_hidden_size=16, n_head=2, n_layer=1, sparsity=0.5)\n"
        "model = AutoModelForCausalLM.from_config(config)\n"
        "print(type(model).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "SparseWideGPTForCausalLM", done.stderr[-2000:]


def test_options_and_overrides_mix_in_any_order():
    args = COMMANDS["pretrain"].parse_intermixed_args(["train.max_steps=6", "--resume", "train.output_dir=X"])
    assert args.resume and args.overrides == ["train.max_steps=6", "train.output_dir=X"]


def test_a_refusal_is_one_line_and_debug_shows_its_traceback(capsys, monkeypatch, tmp_path):
    argv = ["pretrain", f"train.output_dir={tmp_path / 'run'}", "train.max_stepz=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-sparse-ift pretrain: error: ") and "train.max_stepz" in err and "Traceback" not in err
    with pytest.raises(UsageError, match=r"train\.max_stepz"):
        main(["--debug", *argv])
    monkeypatch.setenv("HF_SPARSE_IFT_DEBUG", "1")
    with pytest.raises(UsageError, match=r"train\.max_stepz"):
        main(argv)


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    """Only the package's own refusals become one-line messages: any other exception (a ValueError from torch or
    numpy, say) keeps its traceback."""
    from hf_sparse_ift.cli import pretrain

    def broken(args):
        raise ValueError("an internal bug")

    monkeypatch.setitem(pretrain.HANDLERS, "plan", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["plan"])


def test_file_refusals_are_usage_errors_and_their_os_errors():
    assert issubclass(InputNotFoundError, UsageError) and issubclass(InputNotFoundError, FileNotFoundError)
    assert issubclass(OutputExistsError, UsageError) and issubclass(OutputExistsError, FileExistsError)
    assert issubclass(UsageError, ValueError)


def test_python_dash_m_runs_the_command():
    """``python -m hf_sparse_ift.cli`` (what the pretrain tests and accelerate users run) goes through the import hook
    that registers the Auto classes: it must hand runpy the wrapped loader's get_code."""
    done = subprocess.run([sys.executable, "-m", "hf_sparse_ift.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: hf-sparse-ift"), done.stderr[-2000:]
