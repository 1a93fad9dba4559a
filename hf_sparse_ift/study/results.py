"""A study's results as typed records: each run read from its own files, each arm's spread over seeds, and the
verdict: every comparison of the best of a group of Sparse Wide arms against a control.

Spread is the sample standard deviation over seeds. A difference "exceeds the seed spread" when the two
arms' mean ± std intervals do not overlap (|Δ| > std_a + std_b); with one seed there is no spread to judge by.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..models.sparse_wide_gpt.iso_flop import ISO_FLOP_TOLERANCE
from .arms import Arm, FlopAccounting, arm_accounting, arm_name, flop_accounting
from .config import ArmKind, StudyConfig

VALIDATION_TAGS = ("val/loss", "val/running_seconds")
SPECTRAL_KEYS = ("ramanujan_gap", "weighted_spectral_gap")


@dataclass(frozen=True)
class Spread:
    """Mean, sample std, min and max of the values measured over seeds (None where nothing was measured)."""

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    n: int
    values: list[float]

    @classmethod
    def of(cls, values: list[float | None]) -> Spread:
        values = [v for v in values if v is not None]
        if not values:
            return cls(None, None, None, None, 0, [])
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, min(values), max(values), len(values), values)


@dataclass(frozen=True)
class CurvePoint:
    step: int
    tokens: int
    flops_ideal: float
    flops_executed: float
    wall_seconds: float  # time the run had spent running at this step (a stopped run's pause excluded)
    loss: float


@dataclass
class RunResult:
    """One (arm, seed) run as its folder records it."""

    seed: int
    folder: str
    steps: int
    tokens: int
    wall_seconds: float  # time spent running (train_summary.json), evaluation and checkpoints included
    tokens_per_s: float | None
    final_val_loss: float | None
    final_train_loss: float | None
    val_curve: list[CurvePoint]
    spectral: dict[str, list[tuple[int, float]]] | None = None
    source: str = "run folder"  # or: recorded in an earlier results.json whose run folder is gone

    @classmethod
    def from_dict(cls, record: dict) -> RunResult:
        """A run as an earlier results.json recorded it."""
        spectral = record.get("spectral")
        return cls(
            seed=record["seed"],
            folder=record["folder"],
            steps=record["steps"],
            tokens=record["tokens"],
            wall_seconds=record["wall_seconds"],
            tokens_per_s=record.get("tokens_per_s"),
            final_val_loss=record.get("final_val_loss"),
            final_train_loss=record.get("final_train_loss"),
            val_curve=[CurvePoint(**point) for point in record["val_curve"]],
            spectral=None if spectral is None else {k: [tuple(p) for p in v] for k, v in spectral.items()},
            source=record.get("source", "run folder"),
        )


@dataclass
class ArmResult:
    """One arm: its accounting and its finished runs."""

    name: str
    kind: ArmKind
    sparsity: float
    method: str
    notes: list[str]
    accounting: FlopAccounting
    runs: list[RunResult]
    iso_time_reference: str | None = None  # dense-iso-time: the Sparse Wide arm whose wall-clock it matches
    block: int = 1  # weight-block side of the arm's masks, or of the Sparse Wide arm a dense-iso-time arm matches
    final_val_loss: Spread = field(init=False)
    wall_seconds: Spread = field(init=False)

    def __post_init__(self):
        self.final_val_loss = Spread.of([r.final_val_loss for r in self.runs])
        self.wall_seconds = Spread.of([r.wall_seconds for r in self.runs])

    @property
    def finished(self) -> bool:
        return self.final_val_loss.mean is not None

    def seconds_per_step(self) -> float | None:
        """Mean running seconds per optimizer step over the seeds (evaluation and checkpoints included)."""
        if self.wall_seconds.mean is None:
            return None
        return self.wall_seconds.mean / self.accounting.steps


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------
def read_scalars(folder: Path, tags: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """TensorBoard scalars under `folder`: tag -> {step: value}, the last write of each step kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    scalars: dict[str, dict[int, float]] = {tag: {} for tag in tags}
    for directory in sorted({p.parent for p in folder.rglob("events.out.tfevents*")}):
        accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        accumulator.Reload()
        available = set(accumulator.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                for event in accumulator.Scalars(tag):
                    scalars[tag][event.step] = event.value
    return scalars


def _spectral_of(model) -> dict:
    from ..sparsity.spectral import mean_stats, model_spectral_stats

    return mean_stats(model_spectral_stats(model))


def spectral_endpoints(cfg, folder: Path) -> dict:
    """Mean Ramanujan / weighted spectral gap of the initial masks (rebuilt from the seeds) and of the final
    checkpoint's masks."""
    from accelerate.utils import set_seed

    from ..models.sparse_wide_gpt.modeling_sparse_wide_gpt import SparseWideGPTForCausalLM
    from ..sparsity.dst import DSTEngine
    from ..training.checkpoint import list_checkpoints

    set_seed(cfg.train.seed)
    model = SparseWideGPTForCausalLM(cfg.model_config())
    DSTEngine(model, None, cfg.dst, total_steps=cfg.steps())
    ends = {"initial": _spectral_of(model)}
    checkpoints = list_checkpoints(folder)
    if checkpoints and (checkpoints[-1] / "hf").is_dir():
        final = SparseWideGPTForCausalLM.from_pretrained(checkpoints[-1] / "hf")
        ends["final"] = _spectral_of(final)
        ends["final_step"] = int(checkpoints[-1].name.split("-")[1])
    return ends


def _spectral_series(study: StudyConfig, arm: Arm, seed: int, folder: Path) -> dict[str, list[tuple[int, float]]]:
    ends = spectral_endpoints(arm.pretrain_config(str(folder), seed), folder)
    during = read_scalars(folder, tuple(f"dst/mean_{key}" for key in SPECTRAL_KEYS))
    series = {}
    for key in SPECTRAL_KEYS:
        points = [(0, ends["initial"][key])] if key in ends["initial"] else []
        points += sorted(during[f"dst/mean_{key}"].items())
        if key in ends.get("final", {}):
            points.append((ends["final_step"], ends["final"][key]))
        series[key] = points
    return series


def read_run(study: StudyConfig, arm: Arm, seed: int, accounting: FlopAccounting) -> RunResult | None:
    """The finished run of `arm` with `seed` (None when it has no train_summary.json)."""
    folder = arm.run_dir(study, seed)
    path = folder / "train_summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    scalars = read_scalars(folder, VALIDATION_TAGS)
    # A resumed run's summary holds only the evaluations after the resume: TensorBoard has them all.
    losses = dict(scalars["val/loss"])
    losses.update({int(step): loss for step, loss in summary["val_loss"]})
    running = scalars["val/running_seconds"]
    curve = []
    for step, loss in sorted(losses.items()):
        tokens = step * accounting.tokens_per_step
        # runs from before val/running_seconds was logged: their running time spread evenly over their steps
        seconds = running.get(step, summary["wall_seconds"] * step / max(summary["steps"], 1))
        curve.append(
            CurvePoint(
                step=step,
                tokens=tokens,
                flops_ideal=tokens * accounting.flops_per_token.training_ideal,
                flops_executed=tokens * accounting.flops_per_token.training_executed,
                wall_seconds=seconds,
                loss=loss,
            )
        )
    return RunResult(
        seed=seed,
        folder=str(folder),
        steps=summary["steps"],
        tokens=summary["tokens"],
        wall_seconds=summary["wall_seconds"],
        tokens_per_s=summary.get("tokens_per_s"),
        final_val_loss=losses.get(summary["steps"]),
        final_train_loss=summary.get("final_train_loss"),
        val_curve=curve,
        spectral=(
            _spectral_series(study, arm, seed, folder)
            if arm.kind is ArmKind.SPARSE_WIDE and study.study.spectral_gap
            else None
        ),
    )


def recorded_runs(results_json: Path) -> dict[tuple[str, int], RunResult]:
    """(arm, seed) -> run, as an earlier results.json recorded them (empty when there is none)."""
    if not results_json.exists():
        return {}
    recorded = {}
    for arm in json.loads(results_json.read_text()).get("arms", []):
        for run in arm.get("runs", []):
            recorded[(arm["name"], run["seed"])] = RunResult.from_dict(run)
    return recorded


def collect(
    study: StudyConfig,
    arms: list[Arm],
    calibration: dict | None,
    recorded: dict[tuple[str, int], RunResult] | None = None,
) -> list[ArmResult]:
    """Every arm with a known step count and its finished runs. `recorded`: runs of an earlier results.json,
    used (and marked as such) where the run folder is gone."""
    recorded = recorded or {}
    results = []
    for arm in arms:
        if arm.steps is None:
            continue
        accounting = arm_accounting(study, arm)
        runs = []
        for seed in study.study.seeds:
            run = read_run(study, arm, seed, accounting)
            if run is None and (arm.name, seed) in recorded:
                run = recorded[(arm.name, seed)]
                if run.source == "run folder":
                    run.source = "an earlier results.json (run folder gone)"
            if run is not None:
                runs.append(run)
        ran = sorted({run.steps for run in runs})
        notes = list(arm.notes)
        if ran and ran != [arm.steps]:
            # the runs' own records say what ran (a calibration redone after they finished gives other steps)
            notes.append(
                f"the runs did {' / '.join(map(str, ran))} steps (their train_summary.json); the study config and "
                f"calibration now give {arm.steps}"
            )
            accounting = flop_accounting(
                arm.model_config(), study.base.data.seq_len, study.base.train.global_batch_size, ran[-1]
            )
        result = ArmResult(arm.name, arm.kind, arm.sparsity, arm.method, notes, accounting, runs, block=arm.block)
        if arm.kind is ArmKind.DENSE_ISO_TIME and calibration:
            calibrated = calibration["arms"][arm.name]
            result.iso_time_reference = calibrated["reference_arm"]
            result.notes.append(
                f"steps from calibration: {calibrated['reference_arm']} "
                f"{calibrated['sparse_wide_seconds_per_step']:.4f} s/step vs dense "
                f"{calibrated['dense_seconds_per_step']:.4f} s/step (x{calibrated['ratio']:.3f})"
            )
        results.append(result)
    return results


# ----------------------------------------------------------------------------------------------
# Verdict
# ----------------------------------------------------------------------------------------------
class ComparisonKind(str, Enum):
    ISO_BLOCK_FLOP = "iso-block-FLOP"  # the paper's: equal FLOPs in the block linears
    ISO_TOTAL_FLOP_WIDER = "iso-total-FLOP, wider"  # equal total ideal FLOPs, the dense model widened
    ISO_TOTAL_FLOP_TOKENS = "iso-total-FLOP, more tokens"  # equal total ideal FLOPs, the dense base on more data
    ISO_TIME = "iso-time"  # equal wall-clock on this hardware, masks on dense weights
    DYNAMIC_VS_STATIC = "dynamic vs static masks"


# the control each comparison sets Sparse Wide against, and what it holds equal
CONTROLS = {
    ComparisonKind.ISO_BLOCK_FLOP: (
        ArmKind.DENSE,
        "Equal block-layer FLOPs (the paper's iso-FLOP; Sparse Wide's wider embeddings, LM head and attention "
        "cost extra)",
    ),
    ComparisonKind.ISO_TOTAL_FLOP_WIDER: (
        ArmKind.DENSE_ISO_FLOP,
        "Equal total ideal training FLOPs, spent by dense on width (LM head and attention included)",
    ),
    ComparisonKind.ISO_TOTAL_FLOP_TOKENS: (
        ArmKind.DENSE_ISO_FLOP_TOKENS,
        "Equal total ideal training FLOPs, spent by dense on more tokens",
    ),
    ComparisonKind.ISO_TIME: (
        ArmKind.DENSE_ISO_TIME,
        "Equal wall-clock on this hardware",
    ),
}


@dataclass(frozen=True)
class Comparison:
    """`arm` against `control` on final validation loss (lower is better)."""

    kind: ComparisonKind
    sparsity: float
    arm: str
    control: str
    delta: float  # arm - control: negative means the arm is better
    exceeds_seed_spread: bool | None  # None: one seed, no spread to judge by

    @property
    def winner(self) -> str:
        return self.arm if self.delta < 0 else self.control

    @property
    def loser(self) -> str:
        return self.control if self.delta < 0 else self.arm

    @property
    def margin(self) -> float:
        return abs(self.delta)

    def sentence(self) -> str:
        if self.exceeds_seed_spread is None:
            judged = "only one seed: the seed spread is unknown, so this is not evidence either way"
        elif self.exceeds_seed_spread:
            judged = "this exceeds the seed spread (mean ± std intervals do not overlap)"
        else:
            judged = "this is within the seed spread (mean ± std intervals overlap): no real difference shown"
        return f"**{self.winner}** beats {self.loser} by {self.margin:.4f} nats of validation loss; {judged}."


def compare(kind: ComparisonKind, arm: ArmResult, control: ArmResult) -> Comparison:
    a, b = arm.final_val_loss, control.final_val_loss
    beyond = None if a.std is None or b.std is None else abs(a.mean - b.mean) > a.std + b.std
    return Comparison(kind, arm.sparsity, arm.name, control.name, a.mean - b.mean, beyond)


def best_against(kind: ComparisonKind, group: list[ArmResult], control: ArmResult) -> list[Comparison]:
    """Every finished arm of `group` against `control`, the best arm (lowest mean loss) first."""
    finished = sorted((a for a in group if a.finished), key=lambda a: a.final_val_loss.mean)
    if not control.finished:
        return []
    return [compare(kind, arm, control) for arm in finished]


@dataclass
class Verdict:
    lines: list[str]
    comparisons: list[Comparison]


def _flop_gap(kind: ComparisonKind, arm: ArmResult, control: ArmResult, reference: ArmResult) -> float | None:
    """How far `arm`'s FLOPs are from those `kind` holds equal (None: within tolerance, or a comparison that holds no
    FLOPs equal): for iso-block-FLOP the dense `control`'s block layers, for the iso-total-FLOP controls the total of
    `reference`, the masked Sparse Wide arm the control was built to match (to a whole step or width)."""
    if kind is ComparisonKind.ISO_BLOCK_FLOP:
        mine = arm.accounting.flops_per_token.block_layers_forward
        theirs = control.accounting.flops_per_token.block_layers_forward
    elif kind in (ComparisonKind.ISO_TOTAL_FLOP_WIDER, ComparisonKind.ISO_TOTAL_FLOP_TOKENS):
        mine, theirs = arm.accounting.training_flops_ideal, reference.accounting.training_flops_ideal
    else:
        return None
    gap = mine / theirs - 1.0
    return gap if abs(gap) > ISO_FLOP_TOLERANCE else None


def verdict(arms: list[ArmResult], iso_time_method: str) -> Verdict:
    """Per sparsity: the best Sparse Wide arm against each control (iso-block-FLOP, iso-total-FLOP wider and
    more tokens, iso-time), then the best dynamic-mask arm against static masks."""
    by_name = {a.name: a for a in arms}
    lines, comparisons = [], []

    def add(kind: ComparisonKind, group: list[ArmResult], control: ArmResult | None, what: str) -> None:
        if control is None:
            return
        # An equal-FLOPs comparison holds only for arms whose FLOPs are those the control was built to match (the
        # masked Sparse Wide arm's; a block arm whose widths were rounded to its block may differ): the others are
        # named, never compared.
        reference = next((a for a in group if a.block == 1), control)
        unequal = {a.name: _flop_gap(kind, a, control, reference) for a in group}
        unequal = {name: gap for name, gap in unequal.items() if gap is not None}
        if unequal:
            lines.append(
                f"{kind.value} — {what}: not compared, their FLOPs are not those of {control.name}: "
                + ", ".join(f"{name} ({gap:+.1%})" for name, gap in unequal.items())
            )
            group = [a for a in group if a.name not in unequal]
        found = best_against(kind, group, control)
        if found:
            comparisons.extend(found)
            lines.append(f"{kind.value} — {what}: " + found[0].sentence())

    for sparsity in sorted({a.sparsity for a in arms if a.kind is ArmKind.SPARSE_WIDE}):
        sparse_wide = [a for a in arms if a.kind is ArmKind.SPARSE_WIDE and a.sparsity == sparsity]
        for kind, (control_kind, what) in CONTROLS.items():
            control_sparsity = 0.0 if control_kind is ArmKind.DENSE else sparsity
            if kind is not ComparisonKind.ISO_TIME:
                add(
                    kind,
                    sparse_wide,
                    by_name.get(arm_name(control_kind, control_sparsity)),
                    f"sparsity {sparsity:g}, {what}",
                )
                continue
            for block in sorted({a.block for a in sparse_wide}):  # each against the control given its wall-clock
                group = [a for a in sparse_wide if a.method == iso_time_method and a.block == block]
                layout = "masks on dense weights" if block == 1 else f"{block}x{block} blocks, active blocks only"
                control = by_name.get(arm_name(control_kind, control_sparsity, block=block))
                add(kind, group, control, f"sparsity {sparsity:g}, equal wall-clock on this hardware ({layout})")
        for block in sorted({a.block for a in sparse_wide}):
            static = by_name.get(arm_name(ArmKind.SPARSE_WIDE, sparsity, "static", block))
            dynamic = [a for a in sparse_wide if a.method != "static" and a.block == block]
            layout = "" if block == 1 else f", {block}x{block} blocks"
            add(ComparisonKind.DYNAMIC_VS_STATIC, dynamic, static, f"sparsity {sparsity:g}{layout}")
    return Verdict(lines, comparisons)
