"""The `hf-sparse-ift` command.

    hf-sparse-ift pretrain --config configs/pretrain-tiny.yaml [--resume] [train.max_steps=100 ...]
    hf-sparse-ift plan --config configs/pretrain-gpt3-small-sw75-set.yaml [--mfu 0.4]
    hf-sparse-ift evaluate --model outputs/tiny/checkpoint-300/hf --suite paper
    hf-sparse-ift compare results/dense.json results/sw75.json --paper
    hf-sparse-ift card outputs/tiny/checkpoint-300/hf [--results results.json] [--push-to-hub user/name]

Multi-process: ``accelerate launch scripts/pretrain.py --config ...`` (same arguments as ``pretrain``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .study import commands as study_commands

DEFAULT_PRETRAIN_CONFIG = "pretrain-tiny"


def _pretrain_parser(sub) -> None:
    from .training.config import config_keys

    keys = "; ".join(f"{section}: {', '.join(names)}" for section, names in config_keys().items())
    p = sub.add_parser(
        "pretrain",
        help="pretrain a Sparse Wide GPT (use under `accelerate launch` for several processes)",
        description="Pretrain a Sparse Wide GPT from a YAML config. Trailing KEY=VALUE arguments override config "
        "keys with dotted names, e.g. train.max_steps=100 dst.method=rigl model.sparsity=0.5. "
        f"Keys by section -- {keys}. See configs/*.yaml and the docstrings of "
        "hf_sparse_ift.training.config.",
    )
    p.add_argument(
        "--config",
        default=DEFAULT_PRETRAIN_CONFIG,
        help="YAML path or preset name in configs/ (default: %(default)s, the built-in tiny job)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue exactly from the newest complete checkpoint in train.output_dir"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved run config (derived sizes, data source, steps) and exit",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def _plan_parser(sub) -> None:
    from .training.hardware import PEAK_TFLOPS

    p = sub.add_parser("plan", help="parameters, FLOPs and GPU hours of a pretraining config")
    p.add_argument("--config", default=DEFAULT_PRETRAIN_CONFIG, help="YAML path or preset name in configs/")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=PEAK_TFLOPS["H100"],
        help="accelerator peak, dense bf16 TFLOP/s (default: H100, %(default)s)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    study_commands.add_plan_arguments(p)  # study: --study / --paper-scale


def cmd_pretrain(args) -> int:
    from .training.config import load_pretrain_config
    from .training.loop import NonFiniteLossError, pretrain

    cfg = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        from .training.run import resolve_run

        print(resolve_run(cfg, int(os.environ.get("WORLD_SIZE", "1"))).to_yaml())
        return 0
    try:
        summary = pretrain(cfg, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"hf-sparse-ift pretrain: stopped: {err}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0 and summary:
        keys = ("steps", "tokens", "wall_seconds", "dataset", "processes", "skipped_documents")
        print(json.dumps({k: summary.get(k) for k in keys}))
    return 0


def plan(cfg, mfu: float, peak_tflops: float) -> dict:
    from .models.sparse_wide_gpt.iso_flop import chinchilla_tokens, model_summary

    model = model_summary(cfg.model_config(), cfg.data.seq_len)
    tokens = cfg.steps() * cfg.train.global_batch_size * cfg.data.seq_len
    total = model["training_flops_per_token"] * tokens
    executed = model["training_flops_per_token_executed"] * tokens
    return {
        "widths": f"d_model {model['dense_hidden_size']} -> {model['hidden_size']}, d_ff "
        f"{model['dense_intermediate_size']} -> {model['intermediate_size']}, layer sparsity "
        f"{model['layer_sparsity']:.4f}",
        "parameters_total": model["parameters_total"],
        "parameters_active": model["parameters_active"],
        "dense_parameters": model["parameters_dense_reference"],
        "forward_flops_per_token": model["forward_flops_per_token"],
        "forward_flops_per_token_executed": model["forward_flops_per_token_executed"],
        "flop_ratio_to_dense": model["flop_ratio_to_dense"],
        "chinchilla_tokens_active": chinchilla_tokens(model["parameters_active"]),
        "chinchilla_tokens_dense": chinchilla_tokens(model["parameters_dense_reference"]),
        "training_tokens": tokens,
        "training_steps": cfg.steps(),
        "training_flops": total,
        "training_flops_executed": executed,
        "gpu_hours_at_mfu": total / (mfu * peak_tflops * 1e12) / 3600,
        "gpu_hours_masked_dense_at_mfu": executed / (mfu * peak_tflops * 1e12) / 3600,
    }


def cmd_plan(args) -> int:
    from .training.config import load_pretrain_config

    if args.study:  # study: plan every arm of a study
        return study_commands.cmd_plan_study(args)

    cfg = load_pretrain_config(args.config, args.overrides)
    result = plan(cfg, args.mfu, args.peak_tflops)
    width = max(map(len, result))
    for key, value in result.items():
        text = f"{value:,.4g}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) else value)
        print(f"{key.ljust(width)}  {text}")
    print(
        f"(GPU hours assume {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s; 'masked_dense' counts the "
        "FLOPs a GPU executes with masks on dense weights)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-sparse-ift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _pretrain_parser(sub)
    _plan_parser(sub)
    study_commands.add_parser(sub)  # study
    from .evaluation import commands as evaluation

    evaluation.add_parsers(sub)
    from .sparsity import commands as sparse_commands  # compress / decompress / condense

    sparse_commands.add_parsers(sub)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    handlers = {
        "pretrain": cmd_pretrain,
        "plan": cmd_plan,
        **evaluation.HANDLERS,
        **study_commands.HANDLERS,
        **sparse_commands.HANDLERS,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"hf-sparse-ift {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process
            print(f"hf-sparse-ift {args.command}: interrupted: {_where_it_stopped(args, argv)}", file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


def _where_it_stopped(args, argv: list[str]) -> str:
    """After Ctrl-C: where the work stopped and the exact command that continues it (pretrain and study resume
    from their newest complete checkpoints; the other commands are run again)."""
    if args.command not in ("pretrain", "study") or getattr(args, "report_only", False):
        return "stopped before it finished; run the command again"
    from .training.checkpoint import newest_complete_checkpoint

    resume = "hf-sparse-ift " + shlex.join(argv if "--resume" in argv else [*argv, "--resume"])
    if args.command == "pretrain":
        from .training.config import load_pretrain_config

        out = Path(load_pretrain_config(args.config, args.overrides).train.output_dir)
        last = newest_complete_checkpoint(out)
        if last is None:
            start = "hf-sparse-ift " + shlex.join([a for a in argv if a != "--resume"])
            return f"no checkpoint in {out} yet, so nothing to resume; start again with: {start}"
        return f"the last checkpoint is {last}; continue from it with: {resume}"
    from .study.config import load_study_config

    out = Path(load_study_config(args.config, args.output_dir).study.output_dir)
    runs = sorted(out.glob("runs/*/seed-*"))
    finished = [run for run in runs if (run / "train_summary.json").exists()]
    unfinished = [run for run in runs if run not in finished]
    where = f"{len(finished)} run(s) finished in {out / 'runs'}"
    if unfinished:
        stopped = max(unfinished, key=lambda run: run.stat().st_mtime)
        last = newest_complete_checkpoint(stopped)
        where += f"; {stopped} resumes from {last.name}" if last else f"; {stopped} has no checkpoint and starts over"
    return f"{where}; continue with: {resume}"


if __name__ == "__main__":
    sys.exit(main())
