"""The sparse layers of a Sparse Wide GPT, and the autograd Functions they compute with.

* `SparseLinear`: an `nn.Linear` with a boolean ``weight_mask``. Inactive weights are kept *exactly zero* (zeroed at
  init, regrown at zero, their gradient masked so no optimizer step moves them), so ``W`` equals ``W * mask`` and the
  forward is one plain ``F.linear(x, W)``; the mask is applied once per step, to the weight gradient
  (`_MaskGradient`).
* `BlockSparseLinear`: only the active (rows, cols) blocks exist, as parameters, gradients and optimizer state; its
  products run on them (`block_sparse.block_sparse_linear`).
* `block_linear`: which of the two (or a dense `nn.Linear`) a block linear of the transformer is, from the config.

Conversions between the two layouts live in `hf_sparse_ift.sparsity.blocks`; the helpers that only dynamic sparse
training uses, in `hf_sparse_ift.sparsity.dst`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .block_sparse import block_sparse_linear
from .block_sparse_layout import block_rows_of, dense_from_blocks
from .compat import distribute_tensor
from .configuration_sparse_wide_gpt import BLOCK_FAN_INS, BLOCK_KERNELS, SparseWideGPTConfig
from .errors import UsageError
from .iso_flop import BLOCK_LINEARS, num_inactive, num_inactive_blocks
from .layer_utils import is_dtensor


class _MaskGradient(torch.autograd.Function):
    """Identity on the weight in forward; multiplies its gradient by the mask in backward.

    A view costs nothing in forward; the backward multiply is one elementwise pass over the weight
    gradient (tiny next to the weight-gradient matmul) and keeps every inactive gradient at 0, so
    clipping, Adam moments and weight decay never see or revive inactive weights. An `observer`
    (set from outside the model, e.g. by a training algorithm that ranks inactive positions by their
    gradient) is handed the gradient before it is masked.
    """

    @staticmethod
    def forward(weight: torch.Tensor, mask: torch.Tensor, observer=None) -> torch.Tensor:
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.observer = inputs[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if ctx.observer is not None:
            ctx.observer(grad)
        return grad * mask, None, None


def derive_seed(*parts: int) -> int:
    """One reproducible seed from several integers (a base seed, a layer index, a step, ...)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % 2**63
    return seed


class SparseLinear(nn.Linear):
    """`nn.Linear` whose weight has a fixed-size set of active positions, ``weight_mask`` (bool).

    Invariant: ``weight[~weight_mask] == 0`` exactly. The mask is a persistent buffer (1 byte per
    weight) because regrown weights are zero too, so a mask cannot be read off the weights.

    The seeded mask is drawn when the layer is built on a real device, so paths that skip weight
    initialisation (``no_init_weights()``, accelerate's ``init_empty_weights()``) still have it; a layer
    built on the meta device gets it from the checkpoint, or from `_init_weights` once materialised.
    """

    sparse_layout = "masked"  # see layer_utils.is_sparse_layer

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sparsity: float = 0.0,
        mask_seed: int = 0,
        residual_projection: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.sparsity = sparsity
        self.mask_seed = mask_seed
        # GPT-2 scales the init of the projections that write into the residual stream by 1/sqrt(2L).
        self.residual_projection = residual_projection
        # Called with the unmasked weight gradient in backward when set (see `_MaskGradient`).
        self.grad_observer = None
        self.register_buffer("weight_mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        # Where the mask came from: "seed" (drawn from mask_seed), "checkpoint", "weights" (rebuilt from the
        # non-zero pattern of loaded weights) or None (not set yet: built on the meta device).
        self._mask_source = None
        if not self.weight_mask.is_meta:
            with torch.no_grad():
                self.weight_mask.copy_(self.random_mask())
            self._mask_source = "seed"

    def random_mask(self) -> torch.Tensor:
        """Uniform random mask with exactly round(s·n) inactive weights, reproducible from the seed."""
        n = self.in_features * self.out_features
        generator = torch.Generator().manual_seed(self.mask_seed)
        inactive = torch.randperm(n, generator=generator, device="cpu")[: num_inactive(n, self.sparsity)]
        mask = torch.ones(n, dtype=torch.bool, device="cpu")
        mask[inactive] = False
        return mask.view(self.out_features, self.in_features)

    def dense_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The full (out_features, in_features) weight, zero at inactive positions: ``weight`` itself (or the given
        gathered one). The same view as `BlockSparseLinear.dense_weight`, for analysis."""
        return self.weight if weight is None else weight

    def effective_weight(self) -> torch.Tensor:
        """The weight to multiply with: itself in forward, with the mask applied to its gradient."""
        weight = self.weight
        if weight.requires_grad and torch.is_grad_enabled():
            return _MaskGradient.apply(weight, self.weight_mask, self.grad_observer)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparsity={self.sparsity:.4f}"

    def shard_mask_like_weight(self) -> None:
        """Under tensor parallelism the weight is a DTensor shard: the mask becomes the matching shard, so the gradient
        mask (`_MaskGradient`) and the checks line up element for element."""
        weight, mask = self.weight, self.weight_mask
        if is_dtensor(weight) and not is_dtensor(mask):
            self._buffers["weight_mask"] = distribute_tensor(
                mask.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None
            )

    def weight_and_mask(self):
        """The weight and mask, also when accelerate offloaded them (to CPU or disk): then they are read from the
        offload hook's weights map. Returns (weight, mask, on_device); (None, None, True) if they cannot be read."""
        weight, mask = self.weight, self.weight_mask
        if not weight.is_meta and not mask.is_meta:
            return weight, mask, True
        weights_map = getattr(getattr(self, "_hf_hook", None), "weights_map", None)
        if weights_map is None:
            return None, None, True
        if weight.is_meta:
            weight = weights_map["weight"]
        if mask.is_meta:
            mask = weights_map["weight_mask"]
        return weight, mask.bool(), False


class _ObserveDenseGradient(torch.autograd.Function):
    """Identity on a layer's output in forward; in backward hands ``observer`` the dense weight gradient
    ``grad_out^T @ x`` (every position, active or not), then passes the output gradient on unchanged.

    A block-sparse layer computes its weight gradient at active blocks only; methods that rank inactive blocks by
    their gradient (RigL) need it everywhere, and only on the steps that update masks, when the observer is set.
    """

    @staticmethod
    def forward(output: torch.Tensor, x: torch.Tensor, observer) -> torch.Tensor:
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.observer = inputs[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        # In fp32: under autocast the output gradient is bf16/fp16 and the saved input fp32 (or the other way), and
        # the ranking of blocks by gradient norm should not depend on the training precision.
        dense_grad = grad.reshape(-1, grad.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()
        ctx.observer(dense_grad)
        return grad, None, None


def block_grid_of(out_features: int, in_features: int, sparsity_block: tuple[int, int]) -> tuple[int, int]:
    """(block-rows, block-columns) of a weight cut into blocks; refuses sizes that are not whole blocks."""
    rows, cols = sparsity_block
    if out_features % rows or in_features % cols:
        raise UsageError(
            f"a {out_features}x{in_features} weight (out_features x in_features) cannot be cut into blocks of "
            f"{rows}x{cols}: out_features={out_features} must be a multiple of {rows} and in_features="
            f"{in_features} a multiple of {cols}"
        )
    return out_features // rows, in_features // cols


class BlockSparseLinear(nn.Module):
    """A linear layer whose weight is made of (rows, cols) blocks, of which only the active ones exist.

    ``weight_blocks`` (n_active, rows, cols) holds the active blocks in the BSR order of `block_sparse_layout.py`
    (by block-row, then block-column), described by the persistent buffers ``block_crow_indices`` and
    ``block_col_indices``: a checkpoint stores the active blocks and their index, nothing else. Parameters,
    gradients and optimizer state exist only for active blocks, and the forward and both backward products run on
    them (`block_sparse_linear`). The number of active blocks is fixed; DST changes which blocks they are.

    For analysis, conversion and tests the layer gives the same views as a `SparseLinear`: ``weight_mask``, the
    full boolean mask (read-only, derived from the block index), and `dense_weight()`, the full weight with zeros
    at inactive positions.
    """

    sparse_layout = "block"  # see layer_utils.is_sparse_layer

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sparsity_block: tuple[int, int],
        sparsity: float = 0.0,
        block_fan_in: str = "any",
        mask_seed: int = 0,
        residual_projection: bool = False,
        kernel: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if block_fan_in not in BLOCK_FAN_INS:
            raise UsageError(f"block_fan_in={block_fan_in!r} is invalid: expected one of {list(BLOCK_FAN_INS)}")
        if kernel not in BLOCK_KERNELS:
            raise UsageError(f"kernel={kernel!r} is invalid: expected one of {list(BLOCK_KERNELS)}")
        # what `block_sparse_linear` computes with (see block_sparse.py; "auto" picks by device at every call)
        self.kernel = kernel
        rows, cols = sparsity_block
        self.block_grid = block_grid_of(out_features, in_features, sparsity_block)
        self.in_features = in_features
        self.out_features = out_features
        self.sparsity_block = (rows, cols)
        self.sparsity = sparsity
        self.block_fan_in = block_fan_in
        self.mask_seed = mask_seed
        self.residual_projection = residual_projection
        # Called with the dense weight gradient in backward when set (see `_ObserveDenseGradient`).
        self.grad_observer = None
        grid_rows, grid_cols = self.block_grid
        n_active = grid_rows * grid_cols - num_inactive_blocks(
            grid_rows, grid_cols, sparsity, block_fan_in == "constant"
        )
        self.weight_blocks = nn.Parameter(torch.empty(n_active, rows, cols, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("block_crow_indices", torch.zeros(grid_rows + 1, dtype=torch.int64, device=device))
        self.register_buffer("block_col_indices", torch.zeros(n_active, dtype=torch.int64, device=device))
        # Where the block index came from: "seed", "checkpoint", or None (not set yet: built on the meta device).
        self._mask_source = None
        if not self.weight_blocks.is_meta:
            self.set_block_mask(self.random_block_mask())
            self._mask_source = "seed"
            self.reset_parameters()

    @property
    def n_active(self) -> int:
        return self.weight_blocks.shape[0]

    def reset_parameters(self) -> None:
        """`nn.Linear`'s initialisation for a dense layer of this size, kept at the active blocks."""
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():
            nn.init.uniform_(self.weight_blocks, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)

    def random_block_mask(self) -> torch.Tensor:
        """Uniform random active blocks, reproducible from the seed: (block-rows, block-columns) bool. With a
        constant block fan-in, every block-row draws its own equally many."""
        grid_rows, grid_cols = self.block_grid
        generator = torch.Generator().manual_seed(self.mask_seed)
        if self.block_fan_in == "constant":
            per_row = self.n_active // grid_rows
            columns = torch.rand(grid_rows, grid_cols, generator=generator).argsort(dim=1)[:, :per_row]
            return torch.zeros(grid_rows, grid_cols, dtype=torch.bool).scatter_(1, columns, True)
        n = grid_rows * grid_cols
        inactive = torch.randperm(n, generator=generator)[: n - self.n_active]
        mask = torch.ones(n, dtype=torch.bool)
        mask[inactive] = False
        return mask.view(grid_rows, grid_cols)

    # --- the block index ---
    @property
    def block_mask(self) -> torch.Tensor:
        """Which blocks are active: (block-rows, block-columns) bool, read off the block index."""
        crow = self.block_crow_indices
        mask = torch.zeros(self.block_grid, dtype=torch.bool, device=crow.device)
        mask[block_rows_of(crow), self.block_col_indices] = True
        return mask

    @torch.no_grad()
    def set_block_mask(self, block_mask: torch.Tensor) -> None:
        """Write the block index of `block_mask` (same number of active blocks). The values in ``weight_blocks`` are
        not moved: that is the caller's job (DST moves them, `sparsity.dst.engine.DSTEngine._apply_blocks`)."""
        if tuple(block_mask.shape) != self.block_grid or int(block_mask.sum()) != self.n_active:
            raise UsageError(
                f"block mask of shape {tuple(block_mask.shape)} with {int(block_mask.sum())} active blocks does not "
                f"fit this layer: expected shape {self.block_grid} with {self.n_active} active blocks"
            )
        block_mask = block_mask.to(self.block_crow_indices.device)
        self.block_crow_indices[0] = 0
        torch.cumsum(block_mask.sum(dim=1), dim=0, out=self.block_crow_indices[1:])
        # nonzero() lists positions in row-major order: by block-row, then block-column (the BSR order).
        self.block_col_indices.copy_(block_mask.nonzero()[:, 1])

    def check_block_index(self) -> None:
        """Refuse a block index (e.g. a loaded one) that is not a BSR index of this layer: row pointers from 0 to
        n_active, columns in range and strictly increasing within each block-row, and with a constant block fan-in,
        as many blocks in every block-row."""
        crow, col = self.block_crow_indices, self.block_col_indices
        grid_rows, grid_cols = self.block_grid
        counts = crow.diff()
        valid = int(crow[0]) == 0 and int(crow[-1]) == self.n_active and bool((counts >= 0).all())
        valid = valid and bool(((col >= 0) & (col < grid_cols)).all())
        if valid:
            positions = block_rows_of(crow) * grid_cols + col
            valid = bool((positions.diff() > 0).all())
        if valid and self.block_fan_in == "constant":
            valid = bool((counts == counts[0]).all())
        if not valid:
            raise UsageError(
                f"block index (block_crow_indices, block_col_indices) is not a valid BSR index of {self.n_active} "
                f"active blocks on a {grid_rows}x{grid_cols} grid (block_fan_in={self.block_fan_in!r}): the checkpoint "
                f"is damaged or was written for another layout"
            )

    # --- the views a masked layer gives ---
    @property
    def weight_mask(self) -> torch.Tensor:
        """The full (out_features, in_features) boolean mask, as `SparseLinear.weight_mask` (read-only)."""
        rows, cols = self.sparsity_block
        return self.block_mask.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)

    def dense_weight(self, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """The full (out_features, in_features) weight, zero at inactive blocks, of `blocks` (default: this layer's
        ``weight_blocks``; pass the gathered values when they are sharded)."""
        blocks = self.weight_blocks if blocks is None else blocks
        return dense_from_blocks(blocks, self.block_crow_indices, self.block_col_indices, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = block_sparse_linear(
            x,
            self.weight_blocks,
            self.block_crow_indices,
            self.block_col_indices,
            self.in_features,
            self.bias,
            kernel=self.kernel,
        )
        if self.grad_observer is not None and torch.is_grad_enabled():
            output = _ObserveDenseGradient.apply(output, x, self.grad_observer)
        return output

    def extra_repr(self) -> str:
        rows, cols = self.sparsity_block
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity_block={rows}x{cols}, active_blocks={self.n_active}, block_fan_in={self.block_fan_in}, "
            f"kernel={self.kernel}"
        )


def effective_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight a fused matmul multiplies with (for a `SparseLinear`, with its gradient masked)."""
    return linear.effective_weight() if isinstance(linear, SparseLinear) else linear.weight


def fusable(linear: nn.Module) -> bool:
    """Whether a projection may join the fused q/k/v matmul, i.e. calling it would compute just ``x W^T + b``.

    Not when something wraps or replaces it: a PEFT adapter (another module type), hooks (accelerate's
    offloading, user probes), a forward installed on the instance (tensor parallelism) or sharded weights.
    """
    return (
        type(linear) in (nn.Linear, SparseLinear)
        and linear.bias is not None
        and not (
            linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks or linear._backward_pre_hooks
        )
        and "forward" not in linear.__dict__
        and not is_dtensor(linear.weight)
    )


def block_linear(config: SparseWideGPTConfig, name: str, layer_idx: int, d_in: int, d_out: int) -> nn.Module:
    """The linear ``name`` (one of `BLOCK_LINEARS`) of block ``layer_idx``: sparse (masked or block-sparse) when
    the config makes it sparse, else `nn.Linear`; each sparse layer's mask seed derives from the config's."""
    residual = name in ("o_proj", "fc_out")
    if config.sparsity > 0 and name in config.sparse_layers:
        seed = derive_seed(config.mask_seed, layer_idx * len(BLOCK_LINEARS) + BLOCK_LINEARS.index(name))
        if config.uses_blocks:
            return BlockSparseLinear(
                d_in,
                d_out,
                sparsity_block=config.block_shape,
                sparsity=config.layer_sparsity,
                block_fan_in=config.block_fan_in,
                mask_seed=seed,
                residual_projection=residual,
                kernel=config.block_kernel,
            )
        return SparseLinear(d_in, d_out, sparsity=config.layer_sparsity, mask_seed=seed, residual_projection=residual)
    linear = nn.Linear(d_in, d_out)
    linear.residual_projection = residual
    return linear


__all__ = [
    "BlockSparseLinear",
    "SparseLinear",
    "block_grid_of",
    "block_linear",
    "derive_seed",
    "effective_weight",
    "fusable",
]
