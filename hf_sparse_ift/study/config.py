"""The study YAML (``configs/study-*.yaml``): which arms to train, on which base pretraining config.

    study:
      output_dir: outputs/study-cpu-small
      arms: [dense, dense-iso-flop, dense-iso-flop-tokens, sparse-wide, dense-iso-time]   # any subset
      sparsities: [0.5, 0.75]            # Sparse Wide sparsities (each gets its own iso-FLOP / iso-time controls)
      methods: [static, set, rigl, srigl]
      seeds: [0, 1, 2]                   # train.seed, model.mask_seed and dst.seed of each run
      iso_time_method: set               # the Sparse Wide arm whose wall-clock dense-iso-time matches
      calibration: {rounds: 3, steps: 3, warmup_steps: 1}  # interleaved timing of dense vs Sparse Wide steps
      allow_repeated_data: false         # true: train past one epoch anyway, with a loud warning
      corpus_tokens: null                # skip counting the training split: you assert its size
      spectral_gap: true                 # track the Ramanujan / weighted spectral gaps of the masks
    base:                                # an ordinary pretraining config of the DENSE base model
      model: {...}                       # (or the name / path of a dense one: base: pretrain-gpt3-small-dense)
      data: {...}
      optim: {...}
      dst: {...}                         # drop_fraction, update_interval, ... (method is set per arm)
      train: {...}                       # output_dir and seed are set per run

Every key is checked before any training: a bad one raises ValueError naming it and the valid values.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from enum import Enum

from .. import checks
from ..errors import UsageError
from ..resources import load_yaml, resolve_config_path
from ..sparsity.dst.methods import METHODS
from ..training.config import PretrainConfig, build_pretrain_config


class ArmKind(str, Enum):
    """What an arm is: the base, Sparse Wide, or one of the dense controls that spends Sparse Wide's budget."""

    DENSE = "dense"  # the base model
    DENSE_ISO_FLOP = "dense-iso-flop"  # widened to Sparse Wide's total ideal FLOPs per token
    DENSE_ISO_FLOP_TOKENS = "dense-iso-flop-tokens"  # the base on more tokens, to Sparse Wide's total ideal FLOPs
    SPARSE_WIDE = "sparse-wide"  # widened by sqrt(1/(1-s)), sparse layers at sparsity s, one arm per DST method
    DENSE_ISO_TIME = "dense-iso-time"  # the base for as long as masked Sparse Wide takes on this hardware


def sparsity_tag(sparsity: float) -> str:
    """The sparsity in percent as arm names write it: a whole percent as an integer (0.75 -> ``75``, the names of
    every shipped study), any other to the digits it needs (0.754 -> ``75.4``, 0.995 -> ``99.5``, 0.001 -> ``0.1``),
    so that two sparsities of a study never share a name. Exact to 1e-6 percent; the study config refuses two
    sparsities closer than that."""
    percent = sparsity * 100
    if abs(percent - round(percent)) < 1e-9:
        return str(round(percent))
    return f"{percent:.6f}".rstrip("0").rstrip(".")


ARM_KINDS = tuple(kind.value for kind in ArmKind)
# the kinds built once per Sparse Wide sparsity (so they need study.sparsities)
PER_SPARSITY_KINDS = (
    ArmKind.DENSE_ISO_FLOP,
    ArmKind.DENSE_ISO_FLOP_TOKENS,
    ArmKind.SPARSE_WIDE,
    ArmKind.DENSE_ISO_TIME,
)


@dataclass
class Calibration:
    rounds: int = 3
    steps: int = 3
    warmup_steps: int = 1

    def validate(self):
        checks.integer("study.calibration.rounds", self.rounds, low=1)
        checks.integer("study.calibration.steps", self.steps, low=1)
        checks.integer("study.calibration.warmup_steps", self.warmup_steps, low=0)


@dataclass
class StudySettings:
    output_dir: str = "outputs/study"
    arms: list[str] = field(default_factory=lambda: list(ARM_KINDS))
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.75])
    methods: list[str] = field(default_factory=lambda: ["static", "set", "rigl", "srigl"])
    # Block-sparse Sparse Wide arms: one per block size and method of `methods` that trains blocks, and an
    # iso-time dense arm per block size (see arms.py). The widths must be multiples of each block size.
    block_sizes: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    iso_time_method: str = "set"
    calibration: Calibration = field(default_factory=Calibration)
    allow_repeated_data: bool = False
    corpus_tokens: int | None = None
    spectral_gap: bool = True

    def validate(self):
        if not isinstance(self.output_dir, str) or not self.output_dir:
            checks.invalid("study.output_dir", self.output_dir, "expected a folder path")
        if not isinstance(self.arms, list) or not self.arms:
            checks.invalid("study.arms", self.arms, f"expected a non-empty list drawn from {list(ARM_KINDS)}")
        for arm in self.arms:
            checks.choice("study.arms[]", arm, ARM_KINDS)
        if len(set(self.arms)) != len(self.arms):
            checks.invalid("study.arms", self.arms, "each arm may appear once")
        needs_sparse = {kind.value for kind in PER_SPARSITY_KINDS} & set(self.arms)
        if not isinstance(self.sparsities, list) or (needs_sparse and not self.sparsities):
            checks.invalid(
                "study.sparsities",
                self.sparsities,
                f"expected a non-empty list of numbers in (0, 1) (arms {sorted(needs_sparse)} need one)",
            )
        for s in self.sparsities:
            checks.number("study.sparsities[]", s, low=0, high=1, low_open=True, high_open=True)
        if len(set(self.sparsities)) != len(self.sparsities):
            checks.invalid("study.sparsities", self.sparsities, "each sparsity may appear once")
        tags = [sparsity_tag(s) for s in self.sparsities]
        if len(set(tags)) != len(tags):
            checks.invalid(
                "study.sparsities",
                self.sparsities,
                f"they name the arms s{', s'.join(tags)}: sparsities must differ by at least 1e-8 so that every arm "
                "has a name of its own",
            )
        if not isinstance(self.methods, list) or ("sparse-wide" in self.arms and not self.methods):
            checks.invalid("study.methods", self.methods, f"expected a non-empty list drawn from {sorted(METHODS)}")
        for m in self.methods:
            checks.choice("study.methods[]", m, sorted(METHODS))
        if len(set(self.methods)) != len(self.methods):
            checks.invalid("study.methods", self.methods, "each method may appear once")
        if not isinstance(self.block_sizes, list):
            checks.invalid("study.block_sizes", self.block_sizes, "expected a list of block sizes, e.g. [16]")
        for block in self.block_sizes:
            checks.integer("study.block_sizes[]", block, low=2)
        if len(set(self.block_sizes)) != len(self.block_sizes):
            checks.invalid("study.block_sizes", self.block_sizes, "each block size may appear once")
        if self.block_sizes and not {"static", "set", "rigl"} & set(self.methods):
            checks.invalid(
                "study.block_sizes",
                self.block_sizes,
                f"block arms train with static, set or rigl, and study.methods={self.methods} holds none of them",
            )
        if self.block_sizes and self.iso_time_method not in ("static", "set", "rigl"):
            checks.invalid(
                "study.iso_time_method",
                self.iso_time_method,
                "with study.block_sizes the iso-time reference is also a block arm: choose static, set or rigl",
            )
        if not isinstance(self.seeds, list) or not self.seeds:
            checks.invalid("study.seeds", self.seeds, "expected a non-empty list of integers >= 0, e.g. [0, 1, 2]")
        for s in self.seeds:
            checks.integer("study.seeds[]", s, low=0)
        if len(set(self.seeds)) != len(self.seeds):
            checks.invalid("study.seeds", self.seeds, "each seed may appear once")
        checks.choice("study.iso_time_method", self.iso_time_method, sorted(METHODS))
        self.calibration.validate()
        if not isinstance(self.allow_repeated_data, bool):
            checks.invalid("study.allow_repeated_data", self.allow_repeated_data, "expected true or false")
        checks.integer("study.corpus_tokens", self.corpus_tokens, low=1, allow_none=True)
        if not isinstance(self.spectral_gap, bool):
            checks.invalid("study.spectral_gap", self.spectral_gap, "expected true or false")


@dataclass
class StudyConfig:
    study: StudySettings
    base_tree: dict
    base: PretrainConfig

    def to_dict(self) -> dict:
        d = asdict(self.study)
        return {"study": d, "base": copy.deepcopy(self.base_tree)}


def _settings(values) -> StudySettings:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UsageError(f"study: expected a mapping of study settings, got {values!r}")
    known = {f.name for f in fields(StudySettings)}
    bad = sorted(set(values) - known)
    if bad:
        raise UsageError(f"unknown study key(s) {[f'study.{k}' for k in bad]}; valid keys: {sorted(known)}")
    values = dict(values)
    calib = values.pop("calibration", None) or {}
    if not isinstance(calib, dict):
        checks.invalid("study.calibration", calib, "expected a mapping with rounds, steps, warmup_steps")
    ckeys = {f.name for f in fields(Calibration)}
    cbad = sorted(set(calib) - ckeys)
    if cbad:
        raise UsageError(f"unknown study key(s) {[f'study.calibration.{k}' for k in cbad]}; valid: {sorted(ckeys)}")
    settings = StudySettings(**values, calibration=Calibration(**calib))
    settings.validate()
    return settings


def build_study_config(tree: dict, output_dir: str | None = None) -> StudyConfig:
    """Validate a study tree ({study: ..., base: ...}); raises ValueError naming the bad key."""
    if not isinstance(tree, dict):
        raise UsageError("a study config is a mapping with the sections 'study' and 'base'")
    unknown = sorted(set(tree) - {"study", "base"})
    if unknown:
        raise UsageError(f"unknown study config section(s) {unknown}; valid: ['study', 'base']")
    settings = _settings(tree.get("study"))
    if output_dir is not None:
        settings.output_dir = output_dir
    base = tree.get("base")
    base_name = base if isinstance(base, str) else None
    if base_name is not None:
        base = load_yaml(resolve_config_path(base_name))
    if not isinstance(base, dict):
        raise UsageError(
            "base: expected a pretraining config (mapping with model, data, optim, dst, train) "
            "or the name / path of one"
        )
    base = copy.deepcopy(base)
    try:
        cfg = build_pretrain_config(copy.deepcopy(base))
    except ValueError as err:
        raise UsageError(f"base: {err}") from None
    model = cfg.model_config()
    if model.sparsity != 0:
        checks.invalid(
            "base.model.sparsity",
            model.sparsity,
            "the base must be the dense model (sparsity 0): the study sets the sparsity of each arm"
            + (
                f" (base: {base_name} is a sparse config: name a dense one such as pretrain-gpt3-small-dense, "
                "or write the model out with sparsity 0)"
                if base_name
                else ""
            ),
        )
    if cfg.data.validation_split is None:
        checks.invalid("base.data.validation_split", None, "a study compares validation losses: name a held-out split")
    for s in settings.sparsities:
        if s > 0 and not model.sparse_layers:
            checks.invalid(
                "base.model.sparse_layers", model.sparse_layers, "Sparse Wide needs at least one sparse layer"
            )
    _check_block_arms(settings, cfg)
    return StudyConfig(study=settings, base_tree=base, base=cfg)


def _check_block_arms(settings: StudySettings, base: PretrainConfig) -> None:
    """Every block arm must be iso-FLOP with the dense base: a block that the widths do not divide into enough
    blocks cannot reach the FLOPs target (the model config refuses it), and such an arm is refused here, before any
    run, instead of being compared as if it were."""
    from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig

    values = base.model_config().dense_arguments()
    for sparsity in settings.sparsities:
        for block in settings.block_sizes:
            try:
                SparseWideGPTConfig(**{**values, "sparsity": float(sparsity), "sparsity_block": block})
            except ValueError as err:
                checks.invalid("study.block_sizes[]", block, f"at sparsity {sparsity}, {err}")


def load_study_config(name_or_path: str, output_dir: str | None = None) -> StudyConfig:
    return build_study_config(load_yaml(resolve_config_path(name_or_path)), output_dir)
