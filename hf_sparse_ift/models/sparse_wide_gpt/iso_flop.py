"""Iso-FLOP arithmetic of Sparse-IFT (Thangarasa et al., arXiv 2303.11525).

Pure Python (no torch): this file travels with every checkpoint as remote code, next to the
configuration, so it must import nothing but the standard library.

Three pieces:
* the Sparse-IFT family formulas (Section 2.3): how wide / how many branches / which rank keeps a
  layer at the FLOPs of the dense layer it replaces;
* a per-token FLOP counter for a GPT, split into sparse block matmuls (active weights only), dense
  matmuls (LM head and any block linear left dense) and attention scores (QK^T and AV);
* calibration (Appendix A.2): bisection for the layer sparsity that makes a widened model's FLOPs
  equal to the dense model's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from .errors import UsageError

# The linear layers inside a transformer block, as named in the model.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc_in", "fc_out")


# ----------------------------------------------------------------------------------------------
# Sparse-IFT family (one dense layer θ ∈ R^{d_in×d_out} at sparsity s, same FLOPs)
# ----------------------------------------------------------------------------------------------
def _check_sparsity(s: float) -> float:
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= s < 1.0:
        raise UsageError(f"sparsity must be a number in [0, 1), got {s!r}")
    return float(s)


def sparse_wide_factor(sparsity: float) -> float:
    """Sparse Wide: inputs and outputs of every layer widen by k = sqrt(1 / (1 - s))."""
    return math.sqrt(1.0 / (1.0 - _check_sparsity(sparsity)))


def sparse_parallel_branches(sparsity: float) -> float:
    """Sparse Parallel: k = 1 / (1 - s) sparse branches, summed."""
    return 1.0 / (1.0 - _check_sparsity(sparsity))


def sparse_factorized_rank(d_in: int, d_out: int, sparsity: float) -> float:
    """Sparse Factorized V^T σ(U^T z): inner width d = d_in·d_out / ((d_in + d_out)(1 - s))."""
    return d_in * d_out / ((d_in + d_out) * (1.0 - _check_sparsity(sparsity)))


def sparse_doped_rank(d_in: int, d_out: int, sparsity: float) -> float:
    """Sparse Doped V^T(U^T z) + σ(θ^T z): dense low-rank width d = s·d_in·d_out / (d_in + d_out)."""
    return _check_sparsity(sparsity) * d_in * d_out / (d_in + d_out)


def family_layer_flops(member: str, d_in: int, d_out: int, sparsity: float) -> float:
    """Multiply-accumulate FLOPs per input row (2 per active weight) of one transformed layer.

    Equal to the dense layer's ``2·d_in·d_out`` for every member: that is the iso-FLOP property.
    """
    s = _check_sparsity(sparsity)
    if member == "dense":
        return 2.0 * d_in * d_out
    if member == "wide":
        k = sparse_wide_factor(s)
        return 2.0 * (k * d_in) * (k * d_out) * (1 - s)
    if member == "parallel":
        return 2.0 * sparse_parallel_branches(s) * d_in * d_out * (1 - s)
    if member == "factorized":
        d = sparse_factorized_rank(d_in, d_out, s)
        return 2.0 * (d_in * d + d * d_out) * (1 - s)
    if member == "doped":
        d = sparse_doped_rank(d_in, d_out, s)
        return 2.0 * (d_in * d + d * d_out) + 2.0 * d_in * d_out * (1 - s)
    raise UsageError(f"member must be one of dense, wide, parallel, factorized, doped; got {member!r}")


def round_up(x: float, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x (tolerant to float noise such as 1536.0000001)."""
    return math.ceil(x / multiple - 1e-9) * multiple


def sparse_wide_widths(
    d_model: int, d_ff: int, n_head: int, sparsity: float, width_multiple: int | None = None
) -> tuple[int, int]:
    """Widened (d_model, d_ff) of Sparse Wide.

    Default (``width_multiple=None``), as the paper's Table 14: d_model = k·d_model rounded up to a
    multiple of the head count, d_ff = round(k·d_ff). GPT-3 Small: 50% -> 1092/4344, 75% -> 1536/6144.
    With ``width_multiple=m``: d_model rounded up to a multiple of lcm(m, n_head) and d_ff rounded up to
    a multiple of m, so head size and matmul shapes suit GPU kernels (the caller re-calibrates s).
    """
    k = sparse_wide_factor(sparsity)
    if width_multiple is None:
        return round_up(k * d_model, n_head), round(k * d_ff)
    return round_up(k * d_model, math.lcm(width_multiple, n_head)), round_up(k * d_ff, width_multiple)


# ----------------------------------------------------------------------------------------------
# FLOP counter
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPTShape:
    """What FLOPs depend on: sizes of a GPT-2/3 style decoder, and its block sparsity."""

    n_layer: int
    d_model: int
    d_ff: int
    vocab_size: int
    seq_len: int
    layer_sparsity: float = 0.0
    sparse_layers: tuple[str, ...] = BLOCK_LINEARS
    # Masks made of (rows, cols) blocks; (1, 1) is unstructured. "constant": every block-row keeps as many blocks.
    sparsity_block: tuple[int, int] = (1, 1)
    block_fan_in: str = "any"


def linear_shapes(d_model: int, d_ff: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each block linear."""
    return {
        "q_proj": (d_model, d_model),
        "k_proj": (d_model, d_model),
        "v_proj": (d_model, d_model),
        "o_proj": (d_model, d_model),
        "fc_in": (d_ff, d_model),
        "fc_out": (d_model, d_ff),
    }


def num_inactive(numel: int, sparsity: float) -> int:
    """Inactive weights of a layer with `numel` weights: exactly round(s·n) (the masks use this too)."""
    return round(sparsity * numel)


def num_inactive_blocks(block_rows: int, block_cols: int, sparsity: float, constant_fan_in: bool = False) -> int:
    """Inactive blocks of a layer cut into block_rows × block_cols blocks: round(s·n) of them, or with a constant
    block fan-in round(s·block_cols) in every block-row (the block masks use this too)."""
    if constant_fan_in:
        return block_rows * num_inactive(block_cols, sparsity)
    return num_inactive(block_rows * block_cols, sparsity)


def layer_inactive_weights(
    d_out: int, d_in: int, sparsity: float, sparsity_block: tuple[int, int] = (1, 1), block_fan_in: str = "any"
) -> int:
    """Inactive weights of one sparse (d_out, d_in) layer: a whole number of blocks (of one weight when unstructured)."""
    rows, cols = sparsity_block
    blocks = num_inactive_blocks(d_out // rows, d_in // cols, sparsity, block_fan_in == "constant")
    return rows * cols * blocks


def _budget_step(d_out: int, d_in: int, sparsity_block: tuple[int, int], block_fan_in: str) -> int:
    """The fewest weights by which a layer's inactive count can change: one block, or one per block-row."""
    rows, cols = sparsity_block
    return rows * cols * (d_out // rows if block_fan_in == "constant" else 1)


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per token. ``*_forward`` count one forward pass; training is 3× forward (the backward pass
    computes the input and the weight gradient, each as costly as the forward matmul).

    * sparse_matmul: block linears that are sparse, active weights only (ideal sparse hardware);
    * sparse_matmul_executed: what those layers execute: masked-dense matmuls (every weight), or with block masks
      only the active blocks;
    * dense_matmul: LM head plus block linears kept dense (embedding look-ups cost no FLOPs);
    * attention: QK^T and AV, 2·2·seq_len·d_model per layer; they grow with width and context and do
      not shrink with sparsity. Counted over the full context, like PaLM's 6N + 12·L·d·T.
    """

    sparse_matmul: float
    sparse_matmul_executed: float
    dense_matmul: float
    attention: float

    @property
    def forward(self) -> float:
        return self.sparse_matmul + self.dense_matmul + self.attention

    @property
    def forward_executed(self) -> float:
        return self.sparse_matmul_executed + self.dense_matmul + self.attention

    @property
    def training(self) -> float:
        return 3.0 * self.forward

    @property
    def training_executed(self) -> float:
        return 3.0 * self.forward_executed

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.update(
            forward=self.forward,
            forward_executed=self.forward_executed,
            training=self.training,
            training_executed=self.training_executed,
        )
        return d


def count_flops(shape: GPTShape) -> FlopCount:
    """Per-token FLOPs of a GPT of the given shape (see `FlopCount`)."""
    sparse = 0.0
    executed = 0.0
    dense = 0.0
    for name, (d_out, d_in) in linear_shapes(shape.d_model, shape.d_ff).items():
        n = d_out * d_in
        if name in shape.sparse_layers:
            inactive = layer_inactive_weights(
                d_out, d_in, shape.layer_sparsity, shape.sparsity_block, shape.block_fan_in
            )
            sparse += 2.0 * (n - inactive)
            # Masked layers multiply their zeros too; block-sparse layers compute only their active blocks.
            executed += 2.0 * (n if shape.sparsity_block == (1, 1) else n - inactive)
        else:
            dense += 2.0 * n
    per_layer_attention = 2.0 * 2.0 * shape.seq_len * shape.d_model
    return FlopCount(
        sparse_matmul=shape.n_layer * sparse,
        sparse_matmul_executed=shape.n_layer * executed,
        dense_matmul=shape.n_layer * dense + 2.0 * shape.d_model * shape.vocab_size,
        attention=shape.n_layer * per_layer_attention,
    )


def count_parameters(shape: GPTShape, n_positions: int, tied_embeddings: bool = True) -> dict[str, int]:
    """Parameters of a GPT of `shape`: total, active (inactive sparse weights excluded), sparse weights and
    inactive ones. Per block: 6 linears, their biases (5·d + d_ff) and two LayerNorms (4·d)."""
    d = shape.d_model
    sparse = 0
    inactive = 0
    block = 9 * d + shape.d_ff
    for name, (d_out, d_in) in linear_shapes(d, shape.d_ff).items():
        block += d_out * d_in
        if name in shape.sparse_layers:
            sparse += d_out * d_in
            inactive += layer_inactive_weights(
                d_out, d_in, shape.layer_sparsity, shape.sparsity_block, shape.block_fan_in
            )
    total = (shape.vocab_size + n_positions) * d + shape.n_layer * block + 2 * d
    if not tied_embeddings:
        total += shape.vocab_size * d
    return {
        "total": total,
        "active": total - shape.n_layer * inactive,
        "sparse_weights": shape.n_layer * sparse,
        "inactive": shape.n_layer * inactive,
    }


def flop_ratio(shape: GPTShape, dense: GPTShape) -> float:
    """Forward FLOPs of `shape` over those of the dense reference: > 1 means more costly than dense."""
    return count_flops(shape).forward / count_flops(dense).forward


# ----------------------------------------------------------------------------------------------
# Calibration (paper Appendix A.2)
# ----------------------------------------------------------------------------------------------
CALIBRATION_SCOPES = ("total", "sparse_layers")


def calibrate_sparsity(dense: GPTShape, wide: GPTShape, scope: str = "total", rtol: float = 1e-6) -> float:
    """Sparsity of `wide`'s sparse layers that makes its FLOPs equal `dense`'s within `rtol`.

    ``scope="total"`` matches whole-model forward FLOPs (A.2: dense embeddings/LM head and attention
    included); ``scope="sparse_layers"`` matches the FLOPs of the transformed layers only (the
    transformation's own iso-FLOP definition, which Table 14 follows). Bisection, since FLOPs fall
    monotonically with sparsity; raises ValueError when no sparsity in [0, 1) reaches the target.
    Masks hold whole weights (or whole blocks of ``wide.sparsity_block``), so a model can only get within one
    weight (block; with a constant block fan-in, one block per block-row) per layer of the target: the tolerance is
    then that granularity instead of `rtol` (GPT-3 scale unstructured models reach 1e-6).
    """
    if scope not in CALIBRATION_SCOPES:
        raise UsageError(f"scope must be one of {CALIBRATION_SCOPES}, got {scope!r}")
    if not wide.sparse_layers:
        raise UsageError("wide.sparse_layers is empty: there is no sparsity to calibrate")

    def flops(shape: GPTShape) -> float:
        c = count_flops(shape)
        return c.forward if scope == "total" else c.sparse_matmul

    def with_s(s: float) -> GPTShape:
        return dataclasses.replace(wide, layer_sparsity=s)

    dense_for_target = dataclasses.replace(dense, sparse_layers=tuple(wide.sparse_layers))
    target = flops(dense_for_target)
    lo, hi = 0.0, 1.0
    if flops(with_s(lo)) < target * (1 - rtol):
        raise UsageError(
            f"widths d_model={wide.d_model}, d_ff={wide.d_ff} already cost fewer FLOPs ({flops(with_s(0)):.6g}) "
            f"than the dense model ({target:.6g}) at sparsity 0: widen more"
        )
    if flops(with_s(hi)) > target * (1 + rtol):
        raise UsageError(
            f"widths d_model={wide.d_model}, d_ff={wide.d_ff} exceed the dense model's {scope} FLOPs "
            f"({target:.6g}) even with every sparse weight removed: no sparsity is iso-FLOP"
        )
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if flops(with_s(mid)) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    # Masks round inactive counts to whole weights; pick the end of the bracket that is closer.
    best = min((lo, hi), key=lambda s: abs(flops(with_s(s)) - target))
    err = abs(flops(with_s(best)) / target - 1.0)
    steps = [
        _budget_step(d_out, d_in, wide.sparsity_block, wide.block_fan_in)
        for name, (d_out, d_in) in linear_shapes(wide.d_model, wide.d_ff).items()
        if name in wide.sparse_layers
    ]
    granularity = 2.0 * wide.n_layer * sum(steps) / target
    if err > max(rtol, granularity):
        raise UsageError(f"calibration reached only {err:.3g} relative error (> rtol={rtol})")
    return best


# How far the sparse-layer FLOPs of a checkpoint's stored derived values (config.json: widths and layer_sparsity) may
# be from those of the values this code derives from its dense sizes and sparsity before loading warns. It never
# refuses: the stored values are what the checkpoint's tensors were built with. A change of rounding or calibration
# moves the FLOPs by a few weights or blocks per layer, far less; a config.json edited by hand (sparsity changed, the
# derived values left) moves them by far more.
STORED_FLOPS_RTOL = 0.01


def stored_flops_mismatch(stored: GPTShape, derived: GPTShape, rtol: float = STORED_FLOPS_RTOL) -> str | None:
    """None when the sparse layers of `stored` (a checkpoint's stored sizes) cost within `rtol` of the FLOPs per
    token of `derived` (what this code derives for the same model); else a sentence naming both figures."""
    have, want = count_flops(stored).sparse_matmul, count_flops(derived).sparse_matmul
    if abs(have - want) <= rtol * want:
        return None
    difference = f"{have / want - 1:+.2%}" if want else "where none are expected"
    return (
        f"the stored sizes (hidden_size={stored.d_model}, intermediate_size={stored.d_ff}, "
        f"layer_sparsity={stored.layer_sparsity!r}) give the sparse layers {have:.6g} FLOPs per token, {difference} "
        f"from the {want:.6g} of the sizes this code derives from the dense sizes and sparsity (hidden_size="
        f"{derived.d_model}, intermediate_size={derived.d_ff}, layer_sparsity={derived.layer_sparsity!r}); more than "
        f"{rtol:.0%} apart"
    )


# How far a block-sparse (or width-rounded) model's sparse-layer FLOPs may fall from the dense model's: masks hold
# whole blocks, so calibration gets within one block per layer of the target, and a block too coarse for the widths
# cannot get close at all. Every shipped configuration is within 0.2%.
ISO_FLOP_TOLERANCE = 0.01


def check_iso_flop(dense: GPTShape, wide: GPTShape, tolerance: float = ISO_FLOP_TOLERANCE) -> None:
    """Refuse a calibrated `wide` model that is not iso-FLOP with `dense`: a sparse layer left without one active
    weight (block), or sparse-layer FLOPs more than `tolerance` away from the dense model's. Raises UsageError naming
    ``sparsity_block`` (or ``width_multiple``) and what would be valid."""
    rows, cols = wide.sparsity_block
    knob = (
        f"sparsity_block={rows if rows == cols else [rows, cols]}"
        if (rows, cols) != (1, 1)
        else "width_multiple (the widths d_model, d_ff are rounded up to it)"
    )
    for name, (d_out, d_in) in linear_shapes(wide.d_model, wide.d_ff).items():
        if name not in wide.sparse_layers:
            continue
        inactive = layer_inactive_weights(d_out, d_in, wide.layer_sparsity, wide.sparsity_block, wide.block_fan_in)
        if inactive >= d_out * d_in:
            raise UsageError(
                f"{knob} is invalid: {name} ({d_out} x {d_in}) keeps no active weight at layer sparsity "
                f"{wide.layer_sparsity:.4f}; choose a block that divides the widths d_model={wide.d_model}, "
                f"d_ff={wide.d_ff} into more blocks (e.g. 16)"
            )
    dense_for_target = dataclasses.replace(dense, sparse_layers=tuple(wide.sparse_layers))
    ratio = count_flops(wide).sparse_matmul / count_flops(dense_for_target).sparse_matmul
    if abs(ratio - 1.0) > tolerance:
        raise UsageError(
            f"{knob} is invalid: with widths d_model={wide.d_model}, d_ff={wide.d_ff} the sparse layers cost "
            f"{ratio:.3f}x the dense model's FLOPs at the nearest layer sparsity {wide.layer_sparsity:.4f} (iso-FLOP "
            f"needs 1 +- {tolerance:g}); choose a block that divides the widths into more blocks (e.g. 16)"
        )


def chinchilla_tokens(num_params: float, tokens_per_param: float = 20.0) -> float:
    """Compute-optimal training tokens (Hoffmann et al. 2022: about 20 tokens per parameter)."""
    return tokens_per_param * num_params


def model_summary(config, seq_len: int | None = None) -> dict:
    """Sizes, parameters and per-token FLOPs of a `SparseWideGPTConfig` next to its dense reference: the one
    count that `plan`, the training records and the model card all show."""
    shape, dense_shape = config.shape(seq_len=seq_len), config.dense_shape(seq_len=seq_len)
    flops, dense = count_flops(shape), count_flops(dense_shape)
    params = count_parameters(shape, config.n_positions, config.tie_word_embeddings)
    dense_params = count_parameters(dense_shape, config.n_positions, config.tie_word_embeddings)
    return {
        "dense_hidden_size": config.dense_hidden_size,
        "dense_intermediate_size": config.dense_intermediate_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "head_dim": config.head_dim,
        "n_positions": config.n_positions,
        "sparsity": config.sparsity,
        "layer_sparsity": config.layer_sparsity,
        "sparse_layers": list(shape.sparse_layers),
        "parameters_total": params["total"],
        "parameters_active": params["active"],
        "parameters_dense_reference": dense_params["total"],
        "sparse_weights": params["sparse_weights"],
        "model_sparsity": params["inactive"] / params["total"],
        "forward_flops_per_token": flops.forward,
        "forward_flops_per_token_executed": flops.forward_executed,
        "training_flops_per_token": flops.training,
        "training_flops_per_token_executed": flops.training_executed,
        "sparse_layer_flops_per_token": flops.sparse_matmul,
        "dense_sparse_layer_flops_per_token": dense.sparse_matmul,
        "flop_ratio_to_dense": flops.forward / dense.forward,
        "executed_flop_ratio_to_dense": flops.forward_executed / dense.forward,
        "dense_forward_flops_per_token": dense.forward,
    }


def training_plan(config, seq_len: int, steps: int, global_batch_size: int, mfu: float, peak_tflops: float) -> dict:
    """What `hf-sparse-ift plan` prints: widths, parameters, FLOPs per token, tokens and FLOPs of a run of `steps`
    optimizer steps of `global_batch_size` sequences, and the GPU-hours at `mfu` of `peak_tflops`."""
    model = model_summary(config, seq_len)
    tokens = steps * global_batch_size * seq_len
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
        "training_steps": steps,
        "training_flops": total,
        "training_flops_executed": executed,
        "gpu_hours_at_mfu": total / (mfu * peak_tflops * 1e12) / 3600,
        "gpu_hours_masked_dense_at_mfu": executed / (mfu * peak_tflops * 1e12) / 3600,
    }
