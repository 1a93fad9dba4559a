"""The arms of a study and their FLOP accounting, from the package's own iso-FLOP arithmetic.

* ``dense``: the base model;
* ``sw-s<S>-<method>``: Sparse Wide at sparsity S (paper widths, k = sqrt(1/(1-S))) trained with a DST method;
* ``dense-iso-flop-s<S>``: a dense model widened until its *total* forward FLOPs per token (LM head and
  attention scores included) equal Sparse Wide S's ideal FLOPs. Widening d_model widens the LM head and the
  attention scores too, so Sparse Wide costs more in total than the dense base: this control pays the dense
  model the same total. d_model is a multiple of the head count; d_ff is solved exactly to close the gap;
* ``dense-iso-time-s<S>``: the dense base trained for as many steps as take the masked-dense Sparse Wide S
  arm's wall-clock on this hardware (steps from an interleaved timing calibration, see `runner`).

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

from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig
from ..models.sparse_wide_gpt.iso_flop import GPTShape, count_flops, count_parameters
from ..training.config import PretrainConfig, build_pretrain_config
from .config import StudyConfig


@dataclass
class Arm:
    name: str
    kind: str  # dense | sparse-wide | dense-iso-flop | dense-iso-time
    sparsity: float  # of the Sparse Wide arm it belongs to (0 for dense)
    method: str  # DST method (static for dense arms)
    tree: dict  # pretraining tree without output_dir / seed
    steps: int | None  # None for dense-iso-time until calibrated
    notes: list[str] = field(default_factory=list)

    def pretrain_config(self, output_dir: str, seed: int) -> PretrainConfig:
        """The ordinary pretraining config of this arm's run with `seed`."""
        if self.steps is None:
            raise RuntimeError(f"arm {self.name}: its step count is not known yet (calibrate first)")
        tree = copy.deepcopy(self.tree)
        tree.setdefault("train", {}).update(output_dir=output_dir, seed=seed, max_steps=self.steps)
        tree["model"]["mask_seed"] = seed
        tree.setdefault("dst", {})["seed"] = seed
        return build_pretrain_config(tree)

    def run_dir(self, study: StudyConfig, seed: int) -> Path:
        """Where this arm's run with `seed` lives in the study's output folder."""
        return Path(study.study.output_dir) / "runs" / self.name / f"seed-{seed}"


def _model_values(cfg: PretrainConfig) -> dict:
    """The base model as explicit SparseWideGPTConfig fields (preset resolved)."""
    c = cfg.model_config()
    keep = (
        "vocab_size",
        "n_positions",
        "n_layer",
        "n_head",
        "dense_hidden_size",
        "dense_intermediate_size",
        "width_multiple",
        "sparse_layers",
        "activation_function",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "layer_norm_epsilon",
        "initializer_range",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    values = {k: getattr(c, k) for k in keep}
    values["sparse_layers"] = list(values["sparse_layers"])
    return values


def dense_iso_flop_widths(base: SparseWideGPTConfig, target_forward: float, seq_len: int) -> tuple[int, int]:
    """(d_model, d_ff) of a dense model of `base`'s depth, heads and vocabulary whose forward FLOPs per token
    equal `target_forward`: d_model the multiple of n_head nearest the continuous solution at the base d_ff/d_model
    ratio, then d_ff solved exactly (rounded to an integer: FLOPs move by 4·L·d_model per unit)."""
    ratio = base.dense_intermediate_size / base.dense_hidden_size
    L, V, T, h = base.n_layer, base.vocab_size, seq_len, base.n_head

    def forward(d: float, dff: float) -> float:
        return 2 * L * (4 * d * d + 2 * d * dff) + 2 * d * V + 4 * T * d * L

    # forward(d, ratio·d) = a·d² + b·d with a = 2L(4 + 2·ratio), b = 2V + 4TL
    a, b = 2 * L * (4 + 2 * ratio), 2 * V + 4 * T * L
    d_cont = (-b + math.sqrt(b * b + 4 * a * target_forward)) / (2 * a)
    best = None
    for d in {max(h, h * math.floor(d_cont / h)), h * math.ceil(d_cont / h)}:
        dff = round((target_forward - 2 * L * 4 * d * d - 2 * d * V - 4 * T * d * L) / (4 * L * d))
        if dff < 1:
            continue
        err = abs(forward(d, dff) / target_forward - 1)
        key = (abs(dff / d - ratio), err)
        if best is None or key < best[0]:
            best = (key, d, dff)
    if best is None:
        raise ValueError(f"no dense width reaches {target_forward:.4g} FLOPs per token")
    return best[1], best[2]


def flop_accounting(cfg: PretrainConfig) -> dict:
    """Widths, parameters and FLOPs of one run config (the same arithmetic as ``hf-sparse-ift plan``)."""
    c = cfg.model_config()
    seq = cfg.data.seq_len
    shape = c.shape(seq_len=seq)
    flops = count_flops(shape)
    params = count_parameters(shape, c.n_positions, c.tie_word_embeddings)
    tokens = cfg.steps() * cfg.train.global_batch_size * seq
    return {
        "d_model": c.hidden_size,
        "d_ff": c.intermediate_size,
        "layer_sparsity": c.layer_sparsity,
        "params_total": params["total"],
        "params_active": params["active"],
        "flops_per_token": {
            # the paper's iso-FLOP quantity: the block linears (sparse ones at their active weights)
            "block_layers_forward": flops.forward - 2.0 * shape.d_model * shape.vocab_size - flops.attention,
            "forward_ideal": flops.forward,
            "forward_executed": flops.forward_executed,
            "training_ideal": flops.training,
            "training_executed": flops.training_executed,
        },
        "tokens_per_step": cfg.train.global_batch_size * seq,
        "steps": cfg.steps(),
        "tokens": tokens,
        "training_flops_ideal": flops.training * tokens,
        "training_flops_executed": flops.training_executed * tokens,
    }


def sw_name(s: float, method: str) -> str:
    return f"sw-s{round(s * 100):d}-{method}"


def build_arms(study: StudyConfig) -> list[Arm]:
    """Every arm of the study, in a stable order (dense, then per sparsity: iso-FLOP, Sparse Wide, iso-time)."""
    st, base = study.study, study.base
    base_tree = copy.deepcopy(study.base_tree)
    model = _model_values(base)
    steps = base.steps()
    seq = base.data.seq_len
    arms: list[Arm] = []

    def tree_for(model_values: dict, method: str, spectral: bool) -> dict:
        tree = copy.deepcopy(base_tree)
        tree["model"] = dict(model_values)
        dst = dict(tree.get("dst") or {})
        dst.update(method=method, spectral_gap=spectral)
        tree["dst"] = dst
        train = dict(tree.get("train") or {})
        train["total_tokens"] = None
        tree["train"] = train
        return tree

    dense_values = {**model, "sparsity": 0.0}
    if "dense" in st.arms:
        arms.append(Arm("dense", "dense", 0.0, "static", tree_for(dense_values, "static", False), steps))
    for s in st.sparsities:
        sw_values = {**model, "sparsity": float(s)}
        sw_config = SparseWideGPTConfig(**sw_values)
        if "dense-iso-flop" in st.arms:
            target = count_flops(sw_config.shape(seq_len=seq)).forward
            d, dff = dense_iso_flop_widths(SparseWideGPTConfig(**dense_values), target, seq)
            values = {**dense_values, "dense_hidden_size": d, "dense_intermediate_size": dff}
            got = count_flops(
                GPTShape(n_layer=model["n_layer"], d_model=d, d_ff=dff, vocab_size=model["vocab_size"], seq_len=seq)
            ).forward
            arm = Arm(
                f"dense-iso-flop-s{round(s * 100):d}",
                "dense-iso-flop",
                float(s),
                "static",
                tree_for(values, "static", False),
                steps,
            )
            arm.notes.append(
                f"total forward FLOPs/token {got:.6g} vs Sparse Wide {target:.6g} "
                f"(relative gap {got / target - 1:+.2e})"
            )
            arms.append(arm)
        if "sparse-wide" in st.arms:
            for m in st.methods:
                arms.append(
                    Arm(sw_name(s, m), "sparse-wide", float(s), m, tree_for(sw_values, m, st.spectral_gap), steps)
                )
        if "dense-iso-time" in st.arms:
            arms.append(
                Arm(
                    f"dense-iso-time-s{round(s * 100):d}",
                    "dense-iso-time",
                    float(s),
                    "static",
                    tree_for(dense_values, "static", False),
                    None,
                )
            )
    return arms


def iso_time_reference(study: StudyConfig, arm: Arm) -> Arm:
    """The masked-dense Sparse Wide arm whose wall-clock a dense-iso-time arm matches."""
    values = {**_model_values(study.base), "sparsity": arm.sparsity}
    tree = copy.deepcopy(arm.tree)
    tree["model"] = values
    tree["dst"] = {**tree.get("dst", {}), "method": study.study.iso_time_method}
    return Arm(
        sw_name(arm.sparsity, study.study.iso_time_method),
        "sparse-wide",
        arm.sparsity,
        study.study.iso_time_method,
        tree,
        study.base.steps(),
    )
