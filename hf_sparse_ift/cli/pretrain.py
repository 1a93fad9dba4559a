"""``hf-sparse-ift pretrain`` and ``hf-sparse-ift plan``."""

from __future__ import annotations

import json
import os
import sys

from ..training.hardware import PEAK_TFLOPS
from . import study

DEFAULT_PRETRAIN_CONFIG = "pretrain-tiny"


def add_parsers(sub) -> None:
    from ..training.config import section_keys

    keys = "; ".join(f"{section}: {', '.join(names)}" for section, names in section_keys().items())
    p = sub.add_parser(
        "pretrain",
        help="pretrain a Sparse Wide GPT (use under `accelerate launch` for several processes)",
        description="Pretrain a Sparse Wide GPT from a YAML config. KEY=VALUE arguments (before or after the "
        "options) override config keys with dotted names, e.g. train.max_steps=100 dst.method=rigl "
        "model.sparsity=0.5. Keys by section -- model: preset and the arguments of SparseWideGPTConfig; "
        f"{keys}. See configs/*.yaml and the docstrings of hf_sparse_ift.training.config.",
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
    study.add_plan_arguments(p)  # study: --study / --paper-scale


def cmd_pretrain(args) -> int:
    from ..training import NonFiniteLossError, load_pretrain_config, pretrain

    cfg = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        from ..training.run import resolve_run

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


def _check_plan_args(args) -> None:
    """Refuse what plan would otherwise divide by, print as a nonsense figure, or ignore."""
    from ..errors import UsageError

    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu {args.mfu:g} is invalid: expected a fraction of the peak, 0 < mfu <= 1 (e.g. 0.4)")
    if not args.peak_tflops > 0:
        raise UsageError(f"--peak-tflops {args.peak_tflops:g} is invalid: expected the accelerator's peak, > 0")
    if args.paper_scale and not args.study:
        raise UsageError("--paper-scale applies to a study's arms: pass it with --study <study yaml>")
    if args.study and args.overrides:
        raise UsageError(
            f"KEY=VALUE overrides {args.overrides} apply to one pretraining config, not to --study {args.study} "
            "(they would be ignored): edit the study's base instead"
        )


def cmd_plan(args) -> int:
    from ..training import load_pretrain_config

    _check_plan_args(args)
    if args.study:  # study: plan every arm of a study
        return study.cmd_plan_study(args)

    cfg = load_pretrain_config(args.config, args.overrides)
    result = cfg.plan(args.mfu, args.peak_tflops)
    width = max(map(len, result))
    for key, value in result.items():
        text = f"{value:,.4g}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) else value)
        print(f"{key.ljust(width)}  {text}")
    print(
        f"(GPU hours assume {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s; 'masked_dense' counts the "
        "FLOPs a GPU executes with masks on dense weights)"
    )
    return 0


HANDLERS = {"pretrain": cmd_pretrain, "plan": cmd_plan}
