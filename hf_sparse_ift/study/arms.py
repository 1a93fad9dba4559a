"""The arms of a study and their FLOP accounting, from the package's own iso-FLOP arithmetic.

* ``dense``: the base model;
* ``sw-s<S>-<method>``: Sparse Wide at sparsity S (paper widths, k = sqrt(1/(1-S))) trained with a DST method;
* ``dense-iso-flop-s<S>``: a dense model widened until its *total* forward FLOPs per token (LM head and
  attention scores included) equal Sparse Wide S's ideal FLOPs. Widening d_model widens the LM head and the
  attention scores too, so Sparse Wide costs more in total than the dense base: this control pays the dense
  model the same total as width. d_model is a multiple of the head count; d_ff is solved exactly to close the gap;
* ``dense-iso-flop-tokens-s<S>``: the dense base trained on more tokens, until its total ideal training FLOPs
  equal Sparse Wide S's: the same total compute spent on data instead of width;
* ``dense-iso-time-s<S>``: the dense base trained for as many steps as take the masked-dense Sparse Wide S
  arm's wall-clock on this hardware (steps from a timing calibration of the real training step, see `runner`);
* with ``study.block_sizes``, for each block size B: ``sw-s<S>-block<B>-<method>``, Sparse Wide whose masks are
  B x B blocks stored and computed as active blocks only (model key ``sparsity_block``; methods that train blocks:
  static, set, rigl), and ``dense-iso-time-s<S>-block<B>``, the dense base for as long as the block-sparse arm
  takes.

FLOPs per token (`iso_flop.count_flops`, forward; training = 3 x forward):
  block_layers  = the paper's iso-FLOP quantity: the block linears (sparse ones at their active weights);
  ideal         = everything with sparse layers at their active weights (the paper's accounting);
  executed      = what a GPU runs with masks applied to dense weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig
from ..models.sparse_wide_gpt.iso_flop import count_flops, count_parameters
from ..training.config import PretrainConfig, build_pretrain_config
from .config import ArmKind, StudyConfig, sparsity_tag


def arm_name(kind: ArmKind, sparsity: float = 0.0, method: str = "static", block: int = 1) -> str:
    """The one place arm names are made: ``dense``, ``sw-s75-set``, ``dense-iso-flop-s75``, ... A Sparse Wide arm
    whose masks hold blocks of `block` x `block` weights (model key ``sparsity_block``) is ``sw-s75-block16-set``,
    and the dense arm given its wall-clock ``dense-iso-time-s75-block16``."""
    if kind is ArmKind.DENSE:
        return kind.value
    percent = sparsity_tag(sparsity)
    if kind is ArmKind.SPARSE_WIDE:
        layout = "" if block == 1 else f"block{block:d}-"
        return f"sw-s{percent}-{layout}{method}"
    layout = "" if block == 1 else f"-block{block:d}"
    return f"{kind.value}-s{percent}{layout}"


# DST methods that train block-sparse layers (SRigL's constant fan-in is per weight, not per block)
BLOCK_METHODS = ("static", "set", "rigl")


@dataclass
class Arm:
    kind: ArmKind
    sparsity: float  # of the Sparse Wide arm it belongs to (0 for dense)
    method: str  # DST method (static for dense arms)
    tree: dict  # pretraining tree without output_dir / seed
    steps: int | None  # None for dense-iso-time until calibrated
    notes: list[str] = field(default_factory=list)
    # Side of the square weight blocks: of this arm's masks (Sparse Wide, model key ``sparsity_block``), or of the
    # Sparse Wide arm whose wall-clock it matches (dense-iso-time); 1 = single weights.
    block: int = 1

    @property
    def name(self) -> str:
        return arm_name(self.kind, self.sparsity, self.method, self.block)

    def pretrain_config(self, output_dir: str, seed: int) -> PretrainConfig:
        """The ordinary pretraining config of this arm's run with `seed`."""
        if self.steps is None:
            raise RuntimeError(f"arm {self.name}: its step count is not known yet (calibrate first)")
        tree = copy.deepcopy(self.tree)
        tree.setdefault("train", {}).update(output_dir=output_dir, seed=seed, max_steps=self.steps)
        tree["model"]["mask_seed"] = seed
        tree.setdefault("dst", {})["seed"] = seed
        return build_pretrain_config(tree)

    def model_config(self) -> SparseWideGPTConfig:
        return SparseWideGPTConfig(**self.tree["model"])

    def run_dir(self, study: StudyConfig, seed: int) -> Path:
        """Where this arm's run with `seed` lives in the study's output folder."""
        return Path(study.study.output_dir) / "runs" / self.name / f"seed-{seed}"


@dataclass(frozen=True)
class FlopsPerToken:
    block_layers_forward: float  # the paper's iso-FLOP quantity: the block linears, sparse ones at active weights
    forward_ideal: float
    forward_executed: float
    training_ideal: float
    training_executed: float


@dataclass(frozen=True)
class FlopAccounting:
    """Widths, parameters and FLOPs of one arm (the same arithmetic as ``hf-sparse-ift plan``)."""

    d_model: int
    d_ff: int
    layer_sparsity: float
    params_total: int
    params_active: int
    params_embedding: int  # token and position embeddings (and an untied LM head): excluded from "non-embedding"
    flops_per_token: FlopsPerToken
    tokens_per_step: int
    steps: int
    tokens: int
    training_flops_ideal: float
    training_flops_executed: float

    @property
    def params_non_embedding_active(self) -> int:
        return self.params_active - self.params_embedding


def flop_accounting(model: SparseWideGPTConfig, seq_len: int, global_batch_size: int, steps: int) -> FlopAccounting:
    """FLOPs and parameters of `model` trained for `steps` steps of `global_batch_size` x `seq_len` tokens."""
    shape = model.shape(seq_len=seq_len)
    flops = count_flops(shape)
    params = count_parameters(shape, model.n_positions, model.tie_word_embeddings)
    embedding_rows = model.vocab_size * (1 if model.tie_word_embeddings else 2) + model.n_positions
    tokens_per_step = global_batch_size * seq_len
    tokens = steps * tokens_per_step
    return FlopAccounting(
        d_model=model.hidden_size,
        d_ff=model.intermediate_size,
        layer_sparsity=model.layer_sparsity,
        params_total=params["total"],
        params_active=params["active"],
        params_embedding=embedding_rows * model.hidden_size,
        flops_per_token=FlopsPerToken(
            block_layers_forward=flops.forward - 2.0 * shape.d_model * shape.vocab_size - flops.attention,
            forward_ideal=flops.forward,
            forward_executed=flops.forward_executed,
            training_ideal=flops.training,
            training_executed=flops.training_executed,
        ),
        tokens_per_step=tokens_per_step,
        steps=steps,
        tokens=tokens,
        training_flops_ideal=flops.training * tokens,
        training_flops_executed=flops.training_executed * tokens,
    )


def arm_accounting(study: StudyConfig, arm: Arm) -> FlopAccounting:
    base = study.base
    return flop_accounting(arm.model_config(), base.data.seq_len, base.train.global_batch_size, arm.steps)


def _model_values(cfg: PretrainConfig) -> dict:
    """The base model as explicit SparseWideGPTConfig arguments of the dense model (preset resolved)."""
    return cfg.model_config().dense_arguments()


def dense_iso_flop_widths(base: SparseWideGPTConfig, target_forward: float, seq_len: int) -> tuple[int, int]:
    """(d_model, d_ff) of a dense model of `base`'s depth, heads and vocabulary whose forward FLOPs per token
    equal `target_forward`: d_model the multiple of n_head nearest the continuous solution at the base d_ff/d_model
    ratio, then d_ff solved exactly (rounded to an integer: FLOPs move by 4·L·d_model per unit)."""
    ratio = base.dense_intermediate_size / base.dense_hidden_size
    n_layer, vocab, heads = base.n_layer, base.vocab_size, base.n_head

    def forward(d: float, d_ff: float) -> float:
        return 2 * n_layer * (4 * d * d + 2 * d * d_ff) + 2 * d * vocab + 4 * seq_len * d * n_layer

    # forward(d, ratio·d) = a·d² + b·d
    a, b = 2 * n_layer * (4 + 2 * ratio), 2 * vocab + 4 * seq_len * n_layer
    d_continuous = (-b + math.sqrt(b * b + 4 * a * target_forward)) / (2 * a)
    best = None
    for d in {max(heads, heads * math.floor(d_continuous / heads)), heads * math.ceil(d_continuous / heads)}:
        d_ff = round((target_forward - forward(d, 0)) / (4 * n_layer * d))
        if d_ff < 1:
            continue
        key = (abs(d_ff / d - ratio), abs(forward(d, d_ff) / target_forward - 1))
        if best is None or key < best[0]:
            best = (key, d, d_ff)
    if best is None:
        raise UsageError(f"no dense width reaches {target_forward:.4g} FLOPs per token")
    return best[1], best[2]


def build_arms(study: StudyConfig) -> list[Arm]:
    """Every arm of the study, in a stable order: dense, then per sparsity the controls around Sparse Wide
    (iso-FLOP wider, iso-FLOP more tokens, Sparse Wide per method, iso-time)."""
    settings, base = study.study, study.base
    kinds = {ArmKind(kind) for kind in settings.arms}
    model = _model_values(base)
    steps = base.steps()
    seq = base.data.seq_len

    def tree_for(model_values: dict, method: str, spectral: bool) -> dict:
        tree = copy.deepcopy(study.base_tree)
        tree["model"] = dict(model_values)
        tree["dst"] = {**(tree.get("dst") or {}), "method": method, "spectral_gap": spectral}
        tree["train"] = {**(tree.get("train") or {}), "total_tokens": None}
        return tree

    dense_values = {**model, "sparsity": 0.0}
    dense_tree = tree_for(dense_values, "static", False)
    dense_forward = count_flops(SparseWideGPTConfig(**dense_values).shape(seq_len=seq)).forward
    arms: list[Arm] = []
    if ArmKind.DENSE in kinds:
        arms.append(Arm(ArmKind.DENSE, 0.0, "static", dense_tree, steps))
    for sparsity in settings.sparsities:
        sparsity = float(sparsity)
        sw_values = {**model, "sparsity": sparsity}
        sw_forward = count_flops(SparseWideGPTConfig(**sw_values).shape(seq_len=seq)).forward
        if ArmKind.DENSE_ISO_FLOP in kinds:
            d, d_ff = dense_iso_flop_widths(SparseWideGPTConfig(**dense_values), sw_forward, seq)
            values = {**dense_values, "dense_hidden_size": d, "dense_intermediate_size": d_ff}
            got = count_flops(SparseWideGPTConfig(**values).shape(seq_len=seq)).forward
            arm = Arm(ArmKind.DENSE_ISO_FLOP, sparsity, "static", tree_for(values, "static", False), steps)
            arm.notes.append(
                f"total forward FLOPs/token {got:.6g} vs Sparse Wide {sw_forward:.6g} "
                f"(relative gap {got / sw_forward - 1:+.2e})"
            )
            arms.append(arm)
        if ArmKind.DENSE_ISO_FLOP_TOKENS in kinds:
            # the same total ideal training FLOPs as Sparse Wide, spent on more steps of the dense base
            token_steps = round(steps * sw_forward / dense_forward)
            arm = Arm(ArmKind.DENSE_ISO_FLOP_TOKENS, sparsity, "static", copy.deepcopy(dense_tree), token_steps)
            arm.notes.append(
                f"{token_steps} steps = {steps} x Sparse Wide's / dense's ideal FLOPs per token "
                f"({sw_forward:.6g} / {dense_forward:.6g}); total FLOPs gap "
                f"{token_steps * dense_forward / (steps * sw_forward) - 1:+.2e}"
            )
            arms.append(arm)
        if ArmKind.SPARSE_WIDE in kinds:
            for method in settings.methods:
                tree = tree_for(sw_values, method, settings.spectral_gap)
                arms.append(Arm(ArmKind.SPARSE_WIDE, sparsity, method, tree, steps))
            for block in settings.block_sizes:
                for method in (m for m in settings.methods if m in BLOCK_METHODS):
                    tree = tree_for({**sw_values, "sparsity_block": block}, method, settings.spectral_gap)
                    arms.append(Arm(ArmKind.SPARSE_WIDE, sparsity, method, tree, steps, block=block))
        if ArmKind.DENSE_ISO_TIME in kinds:
            for block in (1, *settings.block_sizes):
                arms.append(
                    Arm(ArmKind.DENSE_ISO_TIME, sparsity, "static", copy.deepcopy(dense_tree), None, block=block)
                )
    names = [arm.name for arm in arms]
    if len(set(names)) != len(names):  # a run folder and a results row per arm: a shared name would merge two
        twice = sorted({name for name in names if names.count(name) > 1})
        raise UsageError(f"study arms {twice} would share a name (and a run folder); change study.sparsities")
    return arms


def iso_time_reference(study: StudyConfig, arm: Arm) -> Arm:
    """The Sparse Wide arm whose wall-clock a dense-iso-time arm matches: masked-dense, or block-sparse with the
    arm's block size."""
    tree = copy.deepcopy(arm.tree)
    tree["model"] = {**_model_values(study.base), "sparsity": arm.sparsity}
    if arm.block > 1:
        tree["model"]["sparsity_block"] = arm.block
    tree["dst"] = {**tree.get("dst", {}), "method": study.study.iso_time_method}
    method = study.study.iso_time_method
    return Arm(ArmKind.SPARSE_WIDE, arm.sparsity, method, tree, study.base.steps(), block=arm.block)
