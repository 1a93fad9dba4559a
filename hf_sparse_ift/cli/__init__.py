"""The `hf-sparse-ift` command.

    hf-sparse-ift pretrain --config configs/pretrain-tiny.yaml [--resume] [train.max_steps=100 ...]
    hf-sparse-ift plan --config configs/pretrain-gpt3-small-sw75-set.yaml [--mfu 0.4]
    hf-sparse-ift evaluate --model outputs/tiny/checkpoint-300/hf --suite paper
    hf-sparse-ift compare results/dense.json results/sw75.json --paper
    hf-sparse-ift card outputs/tiny/checkpoint-300/hf [--results results.json] [--push-to-hub user/name]
    hf-sparse-ift study --config configs/study-cpu-small.yaml
    hf-sparse-ift compress | decompress | condense | export | import-gpt2 IN OUT; hf-sparse-ift build-kernels

Multi-process: ``accelerate launch scripts/pretrain.py --config ...`` (same arguments as ``pretrain``).

Errors: the package's refusals of bad input (`hf_sparse_ift.errors.UsageError`) are printed as one line, ``hf-sparse-ift
<command>: error: ...``, exit status 2; anything else is a bug and shows its traceback. ``--debug`` (or
``HF_SPARSE_IFT_DEBUG=1``) shows the traceback of a refusal too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from pathlib import Path

from ..errors import UsageError
from . import evaluate, formats, pretrain, study

DEBUG_VARIABLE = "HF_SPARSE_IFT_DEBUG"
# One module per command group; each has add_parsers(sub) and HANDLERS, and imports torch only inside its handlers.
GROUPS = (pretrain, study, evaluate, formats)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for ``--help``) and each command's own parser."""
    parser = argparse.ArgumentParser(
        prog="hf-sparse-ift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return parser, dict(sub.choices)


def _add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of a refused input too (or set {DEBUG_VARIABLE}=1)",
    )


def _handler(command: str):
    for group in GROUPS:
        if command in group.HANDLERS:
            return group.HANDLERS[command]
    raise KeyError(command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = build_parser()
    position = next((i for i, arg in enumerate(argv) if arg in commands), None)
    if position is None:
        parser.parse_args(argv)  # --help, or the error naming the missing or unknown command
        return 2
    global_options = argparse.ArgumentParser(prog="hf-sparse-ift", add_help=False)
    _add_global_options(global_options)
    top = global_options.parse_args(argv[:position])
    command = argv[position]
    # Options and KEY=VALUE overrides mix in any order (pretrain train.max_steps=6 --resume train.output_dir=X).
    args = commands[command].parse_intermixed_args(argv[position + 1 :])
    args.command = command
    debug = top.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        return _handler(command)(args)
    except UsageError as err:
        if debug:
            raise
        print(f"hf-sparse-ift {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process
            print(f"hf-sparse-ift {command}: interrupted: {_where_it_stopped(args, argv)}", file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def _where_it_stopped(args, argv: list[str]) -> str:
    """After Ctrl-C: where the work stopped and the exact command that continues it (pretrain and study resume
    from their newest complete checkpoints; the other commands are run again)."""
    if args.command not in ("pretrain", "study") or getattr(args, "report_only", False):
        return "stopped before it finished; run the command again"
    from ..training import load_pretrain_config, newest_complete_checkpoint

    resume = "hf-sparse-ift " + shlex.join(argv if "--resume" in argv else [*argv, "--resume"])
    if args.command == "pretrain":
        out = Path(load_pretrain_config(args.config, args.overrides).train.output_dir)
        last = newest_complete_checkpoint(out)
        if last is None:
            start = "hf-sparse-ift " + shlex.join([a for a in argv if a != "--resume"])
            return f"no checkpoint in {out} yet, so nothing to resume; start again with: {start}"
        return f"the last checkpoint is {last}; continue from it with: {resume}"
    study_config = importlib.import_module("..study.config", __name__)
    out = Path(study_config.load_study_config(args.config, args.output_dir).study.output_dir)
    runs = sorted(out.glob("runs/*/seed-*"))
    finished = [run for run in runs if (run / "train_summary.json").exists()]
    unfinished = [run for run in runs if run not in finished]
    where = f"{len(finished)} run(s) finished in {out / 'runs'}"
    if unfinished:
        stopped = max(unfinished, key=lambda run: run.stat().st_mtime)
        last = newest_complete_checkpoint(stopped)
        where += f"; {stopped} resumes from {last.name}" if last else f"; {stopped} has no checkpoint and starts over"
    return f"{where}; continue with: {resume}"
