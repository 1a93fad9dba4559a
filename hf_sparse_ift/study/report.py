"""A study's report: results.json, results.md (regime, table, iso-time check, verdict) and the plots, all computed
from the runs' own files (`results`)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UsageError
from .arms import Arm, arm_name, flop_accounting
from .config import ArmKind, StudyConfig
from .plots import plots
from .results import ArmResult, Verdict, collect, recorded_runs, verdict

logger = logging.getLogger("hf_sparse_ift.study")


@dataclass(frozen=True)
class Regime:
    """How much data the study's dense base sees per parameter, and how much of the corpus the largest arm reads."""

    dense_tokens: int
    dense_params_non_embedding: int
    dense_params_total: int
    tokens_in_one_epoch: int | None  # None: the split holds more than `tokens_in_one_epoch_at_least`
    tokens_in_one_epoch_at_least: int | None
    largest_arm_tokens: int

    @property
    def tokens_per_non_embedding_parameter(self) -> float:
        return self.dense_tokens / self.dense_params_non_embedding

    @property
    def tokens_per_parameter(self) -> float:
        return self.dense_tokens / self.dense_params_total

    def epochs_text(self) -> str:
        if self.tokens_in_one_epoch:
            return f"{self.largest_arm_tokens / self.tokens_in_one_epoch:.2f} epochs for the largest arm"
        if self.tokens_in_one_epoch_at_least:
            return (
                f"under one epoch for every arm (the largest reads {self.largest_arm_tokens:,} tokens of a "
                f"training split holding more than {self.tokens_in_one_epoch_at_least:,})"
            )
        return "epochs unknown (no data check recorded)"

    def sentence(self) -> str:
        return (
            f"Regime: the dense base trains on {self.dense_tokens:,} tokens = "
            f"{self.tokens_per_non_embedding_parameter:.1f} tokens per non-embedding parameter "
            f"({self.dense_params_non_embedding:,}) and {self.tokens_per_parameter:.2f} per parameter including "
            f"embeddings ({self.dense_params_total:,}); {self.epochs_text()}."
        )


def regime(study: StudyConfig, arms: list[ArmResult], data_check: dict | None) -> Regime:
    base = study.base
    dense = flop_accounting(base.model_config(), base.data.seq_len, base.train.global_batch_size, base.steps())
    data_check = data_check or {}
    return Regime(
        dense_tokens=dense.tokens,
        dense_params_non_embedding=dense.params_non_embedding_active,
        dense_params_total=dense.params_total,
        tokens_in_one_epoch=data_check.get("tokens_in_one_epoch"),
        tokens_in_one_epoch_at_least=data_check.get("tokens_in_one_epoch_at_least"),
        largest_arm_tokens=max((a.accounting.tokens for a in arms), default=dense.tokens),
    )


@dataclass(frozen=True)
class IsoTimeCheck:
    """The calibrated step-time ratio of masked Sparse Wide over dense against the one the runs measured."""

    arm: str
    reference_arm: str
    calibrated_ratio: float
    measured_ratio: float | None
    measured_from: str

    def sentence(self) -> str:
        measured = "not measured (runs missing)" if self.measured_ratio is None else f"x{self.measured_ratio:.3f}"
        return (
            f"{self.arm}: calibrated {self.reference_arm} / dense step time x{self.calibrated_ratio:.3f}; "
            f"measured in the runs {measured} ({self.measured_from})."
        )


def iso_time_checks(arms: list[ArmResult], calibration: dict | None) -> list[IsoTimeCheck]:
    by_name = {a.name: a for a in arms}
    checks = []
    for arm in arms:
        if arm.kind is not ArmKind.DENSE_ISO_TIME or not calibration:
            continue
        calibrated = calibration["arms"][arm.name]
        reference = by_name.get(calibrated["reference_arm"])
        dense = by_name.get(arm_name(ArmKind.DENSE))
        dense = dense if dense is not None and dense.finished else arm
        sw_step = reference.seconds_per_step() if reference else None
        dense_step = dense.seconds_per_step()
        measured = None if sw_step is None or dense_step is None else sw_step / dense_step
        checks.append(
            IsoTimeCheck(
                arm=arm.name,
                reference_arm=calibrated["reference_arm"],
                calibrated_ratio=calibrated["ratio"],
                measured_ratio=measured,
                measured_from=f"running seconds per step of {calibrated['reference_arm']} over {dense.name}, "
                "evaluation and checkpoints included",
            )
        )
    return checks


def _loss_text(arm: ArmResult) -> str:
    loss = arm.final_val_loss
    if loss.mean is None:
        return "not run"
    std = "n/a" if loss.std is None else f"{loss.std:.4f}"
    recorded = sum(r.source != "run folder" for r in arm.runs)
    return f"{loss.mean:.4f} ± {std} (n={loss.n}" + (f", {recorded} from results.json" if recorded else "") + ")"


def _data_lines(study: StudyConfig, data_check: dict | None) -> list[str]:
    base = study.base
    order = (
        "identical across arms and seeds (no shuffle buffer)."
        if base.data.shuffle_buffer == 0
        else "identical across arms, different between seeds (shuffle buffer seeded by train.seed)."
    )
    lines = [
        f"Data: `{base.data.dataset}`"
        + (f" ({base.data.data_files})" if base.data.data_files else "")
        + f", tokenizer `{base.data.tokenizer}`, {base.data.seq_len} tokens x {base.train.global_batch_size} "
        f"sequences per step. Seeds {study.study.seeds} (train.seed = model.mask_seed = dst.seed); data order " + order
    ]
    if data_check and data_check.get("warning"):
        lines += ["", f"> **REPEATED DATA — NO CLAIM MAY REST ON THIS STUDY.** {data_check['warning']}."]
    return lines


def _time_line(study: StudyConfig, arms: list[ArmResult]) -> str:
    runs = [run for arm in arms for run in arm.runs]
    running = sum(run.wall_seconds for run in runs)
    line = f"Training time: {running / 60:.1f} minutes of running time over {len(runs)} runs"
    on_disk = [Path(run.folder) / "train_summary.json" for run in runs if run.source == "run folder"]
    start = Path(study.study.output_dir) / "study_config.yaml"
    if runs and len(on_disk) == len(runs) and start.exists():
        elapsed = max(p.stat().st_mtime for p in on_disk) - start.stat().st_mtime
        line += f"; {elapsed / 60:.1f} minutes from the study's start to the end of its last run (calibration included)"
    return line + "."


def markdown(
    study: StudyConfig,
    arms: list[ArmResult],
    calibration: dict | None,
    data_check: dict | None,
    study_regime: Regime,
    checks: list[IsoTimeCheck],
    study_verdict: Verdict,
) -> str:
    lines = ["# Does Sparse Wide pay off? Study results", "", *_data_lines(study, data_check)]
    lines += ["", _time_line(study, arms)]
    lines += [
        "",
        "| arm | d_model / d_ff | layer sparsity | params total | params active | tokens / non-emb. active param "
        "| block-layer FLOPs/token (fwd) | train FLOPs/token ideal | train FLOPs/token executed | tokens "
        "| train FLOPs ideal | running s (mean) | final val loss (mean ± std, n) |",
        "|" + "---|" * 13,
    ]
    for arm in arms:
        a, f = arm.accounting, arm.accounting.flops_per_token
        wall = arm.wall_seconds.mean
        lines.append(
            f"| {arm.name} | {a.d_model} / {a.d_ff} | {a.layer_sparsity:.4f} | {a.params_total:,} | "
            f"{a.params_active:,} | {a.tokens / a.params_non_embedding_active:.1f} | {f.block_layers_forward:.3g} | "
            f"{f.training_ideal:.3g} | {f.training_executed:.3g} | {a.tokens:,} | {a.training_flops_ideal:.3g} | "
            f"{'n/a' if wall is None else f'{wall:.0f}'} | {_loss_text(arm)} |"
        )
    lines += [
        "",
        "FLOPs per token from `iso_flop.count_flops` (the numbers `hf-sparse-ift plan` prints): block-layer = "
        "the six linears of every block, sparse ones at their active weights (what the paper keeps iso-FLOP); "
        "training = 3 x forward; *ideal* counts sparse layers at their active weights (the paper's accounting), "
        "*executed* counts them as the masked-dense matmuls a GPU or CPU runs. Running seconds: time each run spent "
        "running (a stopped and resumed run's pause excluded), evaluation and checkpoints included, on a shared "
        "machine.",
    ]
    notes = [f"- {arm.name}: {note}" for arm in arms for note in arm.notes]
    if notes:
        lines += ["", *notes]
    if calibration:
        lines += ["", f"Iso-time calibration ({calibration['device']}): {calibration['method']}."]
        lines += [f"- {check.sentence()}" for check in checks]
        lines += [f"- **Warning**: {warning}." for warning in calibration.get("warnings", [])]
    lines += ["", "## Verdict", "", f"- {study_regime.sentence()}"]
    lines += [f"- {line}" for line in study_verdict.lines] or ["- Not enough finished arms to compare."]
    lines += [
        "",
        "Spread: sample std over seeds. Plots: `loss_vs_flops.png` (validation loss of every arm against tokens, "
        "ideal training FLOPs and running seconds), `final_loss_vs_sparsity.png`, `spectral_gap.png` (mean "
        "Ramanujan gap 2·sqrt(d−1) − μ̂ and weighted spectral gap of the mask graphs, Sparse-IFT §3.1). All runs "
        f"in one TensorBoard view: `tensorboard --logdir {Path(study.study.output_dir) / 'runs'}`.",
        "",
    ]
    return "\n".join(lines)


def _finished_runs(arms: list[ArmResult]) -> set[tuple[str, int]]:
    return {(arm.name, run.seed) for arm in arms for run in arm.runs}


def write_report(
    study: StudyConfig,
    arms: list[Arm],
    calibration: dict | None,
    data_check: dict | None,
    keep_recorded: bool = False,
) -> dict:
    """Write results.json, results.md and the plots; returns results.json's content. `keep_recorded`: runs that
    an earlier results.json recorded and whose folders are gone stay in the report (marked), and a report that
    would still hold fewer finished runs than the earlier one is refused before anything is written."""
    out = Path(study.study.output_dir)
    recorded = recorded_runs(out / "results.json") if keep_recorded else {}
    results = collect(study, arms, calibration, recorded)
    lost = sorted(set(recorded) - _finished_runs(results))
    if lost:
        raise UsageError(
            f"{out / 'results.json'} holds {len(recorded)} finished runs but a report now would hold "
            f"{len(_finished_runs(results))}: {[f'{name} seed {seed}' for name, seed in lost]} would be lost "
            "(their arms are no longer in the study, or calibration.json is gone); nothing was written"
        )
    study_verdict = verdict(results, study.study.iso_time_method)
    study_regime = regime(study, results, data_check)
    checks = iso_time_checks(results, calibration)
    content = {
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "study": study.to_dict()["study"],
        "data": data_check,
        "regime": {
            **asdict(study_regime),
            "tokens_per_non_embedding_parameter": study_regime.tokens_per_non_embedding_parameter,
            "tokens_per_parameter": study_regime.tokens_per_parameter,
        },
        "calibration": calibration,
        "iso_time_check": [asdict(check) for check in checks],
        "arms": [{**asdict(arm), "seeds_finished": [run.seed for run in arm.runs]} for arm in results],
        "verdict": {
            "lines": [study_regime.sentence(), *study_verdict.lines],
            "comparisons": [{**asdict(c), "winner": c.winner, "margin": c.margin} for c in study_verdict.comparisons],
        },
    }
    text = markdown(study, results, calibration, data_check, study_regime, checks, study_verdict)
    (out / "results.json").write_text(json.dumps(content, indent=1, default=float))
    (out / "results.md").write_text(text)
    content["plots"] = plots(out, results)
    logger.info("wrote %s", out / "results.md")
    return content
