"""``hf-sparse-ift study`` and ``hf-sparse-ift plan --study ... [--paper-scale]``.

hf-sparse-ift study --config configs/study-cpu-small.yaml [--resume] [--report-only]
hf-sparse-ift plan --study configs/study-gpu-gpt3-small.yaml [--paper-scale] [--mfu 0.4]
"""

from __future__ import annotations

import copy
import sys
from dataclasses import replace

PAPER_BASE = "pretrain-gpt3-small-dense"  # GPT-3 Small on the Pile, 2.5B tokens (~20 per dense parameter)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "study",
        help="train dense / iso-FLOP / Sparse Wide / iso-time arms on identical data and compare them",
        description="Does Sparse Wide pay off on your data and budget? Trains every arm of a study YAML "
        "(configs/study-*.yaml) x seed as an ordinary pretraining run under <study.output_dir>/runs, "
        "then writes results.json, results.md (table and verdict) and plots there.",
    )
    p.add_argument("--config", required=True, help="study YAML path or preset name in configs/ (study-cpu-small, ...)")
    p.add_argument(
        "--resume", action="store_true", help="skip finished arms and resume killed ones from their checkpoints"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the results from the finished runs, train nothing (refused when the config differs from the "
        "folder's study_config.yaml or the report would hold fewer finished runs than results.json)",
    )
    p.add_argument("--output-dir", default=None, help="override study.output_dir")


def add_plan_arguments(p) -> None:
    p.add_argument("--study", default=None, help="plan every arm of a study YAML instead of one pretraining config")
    p.add_argument(
        "--paper-scale",
        action="store_true",
        help=f"with --study: the paper's scale (base {PAPER_BASE}: GPT-3 Small, Pile, 2.5B tokens)",
    )


def _logging():
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_study(args) -> int:
    from ..study.config import load_study_config
    from ..study.runner import RepeatedDataError, report_only, run_study

    study = load_study_config(args.config, args.output_dir)
    _logging()
    try:
        results = report_only(study) if args.report_only else run_study(study, resume=args.resume)
    except RepeatedDataError as err:
        print(f"hf-sparse-ift study: refused: {err}", file=sys.stderr)
        return 2
    print(f"{study.study.output_dir}/results.md")
    for line in results["verdict"]["lines"]:
        print(f"- {line}")
    return 0


def paper_scale(study):
    """The same arms and seeds on the paper's base: GPT-3 Small on the Pile for 2.5B tokens."""
    from ..resources import load_yaml, resolve_config_path
    from ..study.config import build_study_config

    tree = study.to_dict()
    tree["base"] = load_yaml(resolve_config_path(PAPER_BASE))
    return build_study_config(copy.deepcopy(tree))


def plan_study(study, mfu: float, peak_tflops: float) -> list[dict]:
    """Per arm: widths, parameters, tokens, FLOPs and GPU-hours (per seed and for all seeds). dense-iso-time
    steps are the Sparse Wide reference's steps x its executed-FLOP ratio to dense (equal MFU assumed; a real
    study measures it)."""
    from ..study.arms import arm_accounting, build_arms, iso_time_reference
    from ..study.config import ArmKind

    rate = mfu * peak_tflops * 1e12
    seeds = len(study.study.seeds)
    rows = []
    for arm in build_arms(study):
        note = ""
        if arm.kind is ArmKind.DENSE_ISO_TIME:
            reference = arm_accounting(study, iso_time_reference(study, arm))
            dense = arm_accounting(study, replace(arm, steps=study.base.steps()))
            ratio = reference.flops_per_token.training_executed / dense.flops_per_token.training_executed
            arm.steps = round(study.base.steps() * ratio)
            note = f"steps = reference steps x executed-FLOP ratio {ratio:.3f} (equal MFU assumed)"
        accounting = arm_accounting(study, arm)
        rows.append(
            {
                "arm": arm.name,
                "accounting": accounting,
                "gpu_hours_ideal": accounting.training_flops_ideal / rate / 3600,
                "gpu_hours_executed": accounting.training_flops_executed / rate / 3600,
                "gpu_hours_executed_all_seeds": seeds * accounting.training_flops_executed / rate / 3600,
                "note": note,
            }
        )
    return rows


def cmd_plan_study(args) -> int:
    from ..study.config import load_study_config

    study = load_study_config(args.study)
    if args.paper_scale:
        study = paper_scale(study)
    rows = plan_study(study, args.mfu, args.peak_tflops)
    b = study.base
    print(
        f"Study plan: base {b.model.get('preset', 'custom')} on {b.data.dataset}, {b.data.seq_len} x "
        f"{b.train.global_batch_size} tokens/step, seeds {study.study.seeds}; GPU hours at {args.mfu:.0%} MFU of "
        f"{args.peak_tflops:g} TFLOP/s ('executed': masks on dense weights, what a GPU runs; 'ideal': sparse "
        "layers at their active weights, only on hardware that skips zeros)"
    )
    header = (
        "arm",
        "d_model/d_ff",
        "sparsity",
        "params total",
        "params active",
        "tokens",
        "train FLOPs ideal",
        "train FLOPs executed",
        "GPU-h ideal",
        "GPU-h executed",
        "GPU-h x seeds",
    )
    table = [header]
    for r in rows:
        a = r["accounting"]
        table.append(
            (
                r["arm"],
                f"{a.d_model}/{a.d_ff}",
                f"{a.layer_sparsity:.4f}",
                f"{a.params_total:,}",
                f"{a.params_active:,}",
                f"{a.tokens:.4g}",
                f"{a.training_flops_ideal:.4g}",
                f"{a.training_flops_executed:.4g}",
                f"{r['gpu_hours_ideal']:.1f}",
                f"{r['gpu_hours_executed']:.1f}",
                f"{r['gpu_hours_executed_all_seeds']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    total = sum(r["gpu_hours_executed_all_seeds"] for r in rows)
    print(f"total: {total:,.1f} GPU-hours executed for {len(rows)} arms x {len(study.study.seeds)} seeds")
    for r in rows:
        if r["note"]:
            print(f"{r['arm']}: {r['note']}")
    return 0


HANDLERS = {"study": cmd_study}
