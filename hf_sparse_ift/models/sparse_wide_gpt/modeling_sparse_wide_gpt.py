"""Sparse Wide GPT: the GPT-2/GPT-3 decoder, widened by Sparse-IFT, with masked sparse block linears.

Architecture is GPT-2's (learned positions, pre-LayerNorm, GELU MLP, tied embeddings), so at
sparsity 0 the model computes exactly what `GPT2LMHeadModel` computes (see `convert_gpt2.py`). The
difference: every block linear named in ``config.sparse_layers`` is a `SparseLinear`, which owns a
boolean mask saved in the checkpoint.

Why the forward pass costs one plain dense matmul: inactive weights are kept *exactly zero* (they
are zeroed at init, regrown weights start at zero, and their gradient is masked so no optimizer step
moves them), so ``W`` equals ``W * mask`` and the forward is ``F.linear(x, W)`` with no mask
multiply. The mask is applied once per step, to the weight gradient, in `_MaskGradient.backward`.

The rest follows the in-tree transformers models (GPT-2, Llama): the attention kernel is looked up
in ``ALL_ATTENTION_FUNCTIONS`` at call time, masks come from `masking_utils` (padding, KV cache and
packed sequences), hidden states and attentions are recorded by the output-capturing decorator from
``_can_record_outputs``, and ``return_dict`` follows the call or the config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, find_packed_sequence_indices
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .block_sparse import block_rows_of, block_sparse_linear, dense_from_blocks
from .compat import distribute_tensor
from .condensed_linear import install_condensed_layers
from .configuration_sparse_wide_gpt import BLOCK_FAN_INS, SparseWideGPTConfig
from .iso_flop import BLOCK_LINEARS, num_inactive, num_inactive_blocks
from .layer_utils import full_tensor, is_dtensor
from .sparse_safetensors import SparseCheckpointMixin

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# Sparse linear layer
# ----------------------------------------------------------------------------------------------
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
        ctx.observer(grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))
        return grad, None, None


def _block_grid(out_features: int, in_features: int, sparsity_block: tuple[int, int]) -> tuple[int, int]:
    """(block-rows, block-columns) of a weight cut into blocks; refuses sizes that are not whole blocks."""
    rows, cols = sparsity_block
    if out_features % rows or in_features % cols:
        raise ValueError(
            f"a {out_features}x{in_features} weight (out_features x in_features) cannot be cut into blocks of "
            f"{rows}x{cols}: out_features={out_features} must be a multiple of {rows} and in_features="
            f"{in_features} a multiple of {cols}"
        )
    return out_features // rows, in_features // cols


class BlockSparseLinear(nn.Module):
    """A linear layer whose weight is made of (rows, cols) blocks, of which only the active ones exist.

    ``weight_blocks`` (n_active, rows, cols) holds the active blocks in the BSR order of `block_sparse.py`
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
        device=None,
        dtype=None,
    ):
        super().__init__()
        if block_fan_in not in BLOCK_FAN_INS:
            raise ValueError(f"block_fan_in={block_fan_in!r} is invalid: expected one of {list(BLOCK_FAN_INS)}")
        rows, cols = sparsity_block
        self.block_grid = _block_grid(out_features, in_features, sparsity_block)
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
        not moved: that is the caller's job (see `BlockSparseLinear.move_blocks`)."""
        if tuple(block_mask.shape) != self.block_grid or int(block_mask.sum()) != self.n_active:
            raise ValueError(
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
            raise ValueError(
                f"block index (block_crow_indices, block_col_indices) is not a valid BSR index of {self.n_active} "
                f"active blocks on a {grid_rows}x{grid_cols} grid (block_fan_in={self.block_fan_in!r}): the checkpoint "
                f"is damaged or was written for another layout"
            )

    def block_slots(self, block_mask: torch.Tensor) -> torch.Tensor:
        """For every active block of `block_mask` (BSR order), its slot in ``weight_blocks`` now; -1 where the block
        is not active now."""
        slot = torch.full(self.block_grid, -1, dtype=torch.int64, device=self.block_crow_indices.device)
        slot[block_rows_of(self.block_crow_indices), self.block_col_indices] = torch.arange(
            self.n_active, device=slot.device
        )
        return slot[block_mask.to(slot.device)]

    def block_norms(self, matrix: torch.Tensor) -> torch.Tensor:
        """The Frobenius norm of every block of a dense (out_features, in_features) `matrix` (e.g. a weight gradient),
        as a (block-rows, block-columns) float32 grid."""
        rows, cols = self.sparsity_block
        grid_rows, grid_cols = self.block_grid
        return torch.linalg.vector_norm(matrix.float().reshape(grid_rows, rows, grid_cols, cols), dim=(1, 3))

    def active_block_norms(self, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """The Frobenius norm of every active block of `blocks` (default ``weight_blocks``) in its place on the
        (block-rows, block-columns) grid; 0 at inactive blocks."""
        blocks = self.weight_blocks if blocks is None else blocks
        grid = torch.zeros(self.block_grid, dtype=torch.float32, device=blocks.device)
        norms = torch.linalg.vector_norm(blocks.float(), dim=(1, 2))
        grid[block_rows_of(self.block_crow_indices), self.block_col_indices] = norms
        return grid

    # --- conversion to and from the masked layout ---
    @classmethod
    @torch.no_grad()
    def from_masked(
        cls, linear: SparseLinear, sparsity_block: tuple[int, int], block_fan_in: str = "any"
    ) -> BlockSparseLinear:
        """The block layer holding exactly the weights of `linear`, whose mask must be made of whole blocks."""
        rows, cols = sparsity_block
        out_features, in_features = linear.weight.shape
        grid_rows, grid_cols = _block_grid(out_features, in_features, sparsity_block)
        per_block = linear.weight_mask.reshape(grid_rows, rows, grid_cols, cols).sum(dim=(1, 3))
        partial = int(((per_block > 0) & (per_block < rows * cols)).sum())
        if partial:
            raise ValueError(
                f"{partial} of the {grid_rows * grid_cols} blocks of {rows}x{cols} in this layer's mask are only "
                f"partly active: a mask made of whole blocks is needed to store the layer block by block"
            )
        block_mask = per_block > 0
        counts = block_mask.sum(dim=1)
        if block_fan_in == "constant" and not bool((counts == counts[0]).all()):
            raise ValueError(
                f"block_fan_in='constant' needs the same number of active blocks in every block-row; this mask has "
                f"between {int(counts.min())} and {int(counts.max())}"
            )
        n_active = int(block_mask.sum())
        block = cls(
            in_features,
            out_features,
            bias=linear.bias is not None,
            sparsity_block=sparsity_block,
            sparsity=1.0 - n_active / block_mask.numel(),
            block_fan_in=block_fan_in,
            mask_seed=linear.mask_seed,
            residual_projection=linear.residual_projection,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        block.set_block_mask(block_mask)
        block._mask_source = "checkpoint"
        grid = linear.weight.reshape(grid_rows, rows, grid_cols, cols).permute(0, 2, 1, 3)
        block.weight_blocks.copy_(grid[block_mask])
        if linear.bias is not None:
            block.bias.copy_(linear.bias)
        return block

    @torch.no_grad()
    def to_masked(self) -> SparseLinear:
        """The `SparseLinear` with this layer's weights and mask (inactive weights +0.0)."""
        weight = self.weight_blocks
        linear = SparseLinear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            sparsity=self.sparsity,
            mask_seed=self.mask_seed,
            residual_projection=self.residual_projection,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight_mask.copy_(self.weight_mask)
        linear._mask_source = "checkpoint"
        linear.weight.copy_(self.dense_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

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
            x, self.weight_blocks, self.block_crow_indices, self.block_col_indices, self.in_features, self.bias
        )
        if self.grad_observer is not None and torch.is_grad_enabled():
            output = _ObserveDenseGradient.apply(output, x, self.grad_observer)
        return output

    def extra_repr(self) -> str:
        rows, cols = self.sparsity_block
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity_block={rows}x{cols}, active_blocks={self.n_active}, block_fan_in={self.block_fan_in}"
        )


def _effective_weight(linear: nn.Linear) -> torch.Tensor:
    return linear.effective_weight() if isinstance(linear, SparseLinear) else linear.weight


def _fusable(linear: nn.Module) -> bool:
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


def _block_linear(config: SparseWideGPTConfig, name: str, layer_idx: int, d_in: int, d_out: int) -> nn.Linear:
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
            )
        return SparseLinear(d_in, d_out, sparsity=config.layer_sparsity, mask_seed=seed, residual_projection=residual)
    linear = nn.Linear(d_in, d_out)
    linear.residual_projection = residual
    return linear


# ----------------------------------------------------------------------------------------------
# Transformer block
# ----------------------------------------------------------------------------------------------
def eager_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class SparseWideGPTAttention(nn.Module):
    def __init__(self, config: SparseWideGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attn_pdrop
        self.is_causal = True
        d = config.hidden_size
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, _block_linear(config, name, layer_idx, d, d))
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if torch.is_grad_enabled() and all(_fusable(p) for p in projections):
            # Training: one matmul for q, k and v (a wider GEMM runs closer to peak than three narrow ones);
            # concatenating the weights costs about what autocast's bf16 copy of them costs anyway. Not at
            # inference: decoding is memory-bound and the concatenation would copy 3·d² weights per token.
            weight = torch.cat([_effective_weight(p) for p in projections])
            bias = torch.cat([p.bias for p in projections])
            qkv = F.linear(hidden_states, weight, bias).chunk(3, dim=-1)
        else:
            qkv = tuple(p(hidden_states) for p in projections)
        width = qkv[0].shape[-1]
        if width % self.head_dim:
            raise ValueError(
                f"q_proj gives {width} features here, not a whole number of heads of size {self.head_dim}: under "
                f"tensor parallelism the TP size must divide n_head={self.config.n_head}"
            )
        query, key, value = (t.view(*input_shape, -1, self.head_dim).transpose(1, 2) for t in qkv)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        pad = 0
        if attention_interface is not eager_attention_forward:
            # Fused kernels (flash / memory-efficient) need head sizes that are multiples of 8; the paper's
            # SW-50 width gives 1092 / 12 = 91. Zero-padding q, k, v to 96 leaves every dot product and the
            # output unchanged (the scale stays 1/sqrt(91)) and keeps the fast kernel.
            pad = -self.head_dim % 8
            if pad:
                query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        if pad:
            attn_output = attn_output[..., : self.head_dim]
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.resid_dropout(self.o_proj(attn_output)), attn_weights


class SparseWideGPTMLP(nn.Module):
    def __init__(self, config: SparseWideGPTConfig, layer_idx: int):
        super().__init__()
        self.fc_in = _block_linear(config, "fc_in", layer_idx, config.hidden_size, config.intermediate_size)
        self.fc_out = _block_linear(config, "fc_out", layer_idx, config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        return self.dropout(self.fc_out(self.act(self.fc_in(hidden_states))))


class SparseWideGPTBlock(GradientCheckpointingLayer):
    def __init__(self, config: SparseWideGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = SparseWideGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = SparseWideGPTMLP(config, layer_idx)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None, use_cache=False, **kwargs):
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


# ----------------------------------------------------------------------------------------------
# Pre-trained model plumbing
# ----------------------------------------------------------------------------------------------
_REBUILD_CHOICES = (None, "from_weights")


def _loaded(tensor) -> bool:
    """Whether `from_pretrained` filled this parameter or buffer from the checkpoint."""
    return bool(getattr(tensor, "_is_hf_initialized", False))


class SparseWideGPTPreTrainedModel(SparseCheckpointMixin, PreTrainedModel):
    config_class = SparseWideGPTConfig
    config: SparseWideGPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SparseWideGPTBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": SparseWideGPTBlock,
        "attentions": OutputRecorder(SparseWideGPTAttention, index=1),
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2 initialisation; sparse layers get the same dense init, then their mask zeroes it.

        Weights: N(0, 0.02), residual projections (o_proj, fc_out) N(0, 0.02/sqrt(2·n_layer)), biases 0,
        LayerNorm 1/0. A `SparseLinear` keeps the std of its dense counterpart (the widened layer is
        initialised like a dense layer of its size, then masked), so active weights have GPT-2 scale.
        Anything `from_pretrained` loaded is left as loaded (the `init` functions skip it). A mask is drawn
        from its seed only when it was neither loaded nor drawn yet, and never next to loaded weights: then it is
        read off their non-zero pattern, which `from_pretrained` refuses unless asked (see `_check_loaded_masks`).
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            if isinstance(module, SparseLinear):
                self._init_mask(module)
        elif isinstance(module, BlockSparseLinear):
            # The active blocks of a dense layer initialised as above (the entries are independent draws).
            if module.residual_projection:
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight_blocks, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            self._init_block_index(module)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @staticmethod
    def _init_mask(module: SparseLinear) -> None:
        weight_loaded = _loaded(module.weight)
        if _loaded(module.weight_mask):
            module._mask_source = "checkpoint"
        elif weight_loaded:
            # Trained weights without their mask: a random mask would zero trained weights.
            module.weight_mask.copy_(full_tensor(module.weight).ne(0))
            module._mask_source = "weights"
        elif module._mask_source != "seed":
            module.weight_mask.copy_(module.random_mask())
            module._mask_source = "seed"
        if not weight_loaded:  # +0.0 at inactive positions (a product would leave -0.0 where the draw was negative)
            module.weight.masked_fill_(~module.weight_mask, 0.0)

    def condense(self, representation: str = "auto"):
        """`SparseCheckpointMixin.condense` for masked models; a block-sparse model is refused (it already stores and
        computes only its active blocks)."""
        if self.config.uses_blocks:
            raise ValueError(
                f"this model's sparse layers are block-sparse (sparsity_block={self.config.sparsity_block!r}): they "
                f"already store and compute only their active blocks, and condensing applies to masked layers. "
                f"Convert to the masked layout first (hf_sparse_ift.sparsity.blocks.to_masked_model) to condense."
            )
        return super().condense(representation)

    @staticmethod
    def _init_block_index(module: BlockSparseLinear) -> None:
        if _loaded(module.block_col_indices) and _loaded(module.block_crow_indices):
            module._mask_source = "checkpoint"
        elif _loaded(module.weight_blocks):
            raise ValueError(
                "the checkpoint has the active blocks (weight_blocks) of a block-sparse layer but not its block index "
                "(block_crow_indices, block_col_indices): which blocks they are cannot be recovered"
            )
        elif module._mask_source != "seed":
            module.set_block_mask(module.random_block_mask())
            module._mask_source = "seed"

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        rebuild_masks: str | None = None,
        strict_masks: bool = False,
        **kwargs,
    ):
        r"""`PreTrainedModel.from_pretrained`, plus two options for the sparsity masks.

        Args:
            rebuild_masks (`str`, *optional*):
                A checkpoint whose weights come without their ``weight_mask`` tensors is an error (drawing fresh
                random masks would zero trained weights). ``"from_weights"`` rebuilds each missing mask from the
                non-zero pattern of its weights instead, with a warning: active weights that happen to be exactly
                zero (e.g. regrown at zero and not trained since) become inactive, which cannot be undone.
            strict_masks (`bool`, *optional*, defaults to `False`):
                Weights that are non-zero where their mask is inactive break the model's invariant. By default they
                are set to zero with a warning that counts them; ``strict_masks=True`` raises instead.
        """
        if rebuild_masks not in _REBUILD_CHOICES:
            raise ValueError(f"rebuild_masks={rebuild_masks!r} is invalid: expected one of {list(_REBUILD_CHOICES)}")
        if not isinstance(strict_masks, bool):
            raise ValueError(f"strict_masks={strict_masks!r} is invalid: expected True or False")
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        model._check_tensor_parallel()
        model._check_loaded_masks(rebuild_masks=rebuild_masks, strict_masks=strict_masks)
        for module in model.modules():
            if isinstance(module, BlockSparseLinear):
                module.check_block_index()
        return (model, loading_info) if output_loading_info else model

    def _check_tensor_parallel(self) -> None:
        """Heads are split between ranks whole: refuse a TP size that does not divide n_head (else wrong shapes)."""
        for module in self.modules():
            if isinstance(module, SparseWideGPTAttention) and is_dtensor(getattr(module.q_proj, "weight", None)):
                tp_size = module.q_proj.weight.device_mesh.size()
                if self.config.n_head % tp_size:
                    raise ValueError(
                        f"Tensor parallelism over {tp_size} ranks cannot split n_head={self.config.n_head} attention "
                        f"heads evenly: use a TP size that divides n_head"
                    )
                return

    @torch.no_grad()
    def _check_loaded_masks(self, rebuild_masks: str | None = None, strict_masks: bool = False) -> None:
        """After loading: refuse (or rebuild) missing masks, shard masks like their weights, and repair (or refuse)
        weights that are non-zero at inactive positions."""
        layers = {name: m for name, m in self.named_modules() if isinstance(m, SparseLinear)}
        _check_rebuilt_masks(layers, rebuild_masks)
        for layer in layers.values():
            if layer._mask_source is None:
                layer._mask_source = "checkpoint"
            layer.shard_mask_like_weight()
        _zero_inactive_weights(layers, strict_masks)


def _check_rebuilt_masks(layers: dict[str, SparseLinear], rebuild_masks: str | None) -> None:
    """Layers whose weights loaded without their masks got masks read off their weights (`_init_mask`): an error
    unless ``rebuild_masks="from_weights"`` asked for it, then a warning that counts what that cost."""
    rebuilt = [name for name, m in layers.items() if m._mask_source == "weights"]
    if not rebuilt:
        return
    if rebuild_masks != "from_weights":
        raise ValueError(
            f"The checkpoint has the weights of {len(rebuilt)} sparse layer(s) but not their masks "
            f"({', '.join(n + '.weight_mask' for n in rebuilt[:3])}{', ...' if len(rebuilt) > 3 else ''}). "
            f"Refusing to draw new random masks over trained weights. Load a checkpoint saved with its masks, or "
            f"pass rebuild_masks='from_weights' to rebuild each mask from the non-zero pattern of its weights."
        )
    active = sum(int(layers[n].weight_mask.sum()) for n in rebuilt)
    expected = sum(
        layers[n].weight_mask.numel() - num_inactive(layers[n].weight_mask.numel(), layers[n].sparsity) for n in rebuilt
    )
    logger.warning(
        f"Rebuilt the masks of {len(rebuilt)} sparse layer(s) from the non-zero pattern of their weights "
        f"(rebuild_masks='from_weights'): {active} active weights, where the configured sparsity gives "
        f"{expected}. Active weights that were exactly zero in the checkpoint (e.g. regrown at zero) are now "
        f"inactive; that cannot be recovered from the weights."
    )


def _zero_inactive_weights(layers: dict[str, SparseLinear], strict_masks: bool) -> None:
    """Weights that are non-zero where their mask is inactive break the invariant: zero them with a warning that counts
    them, or refuse (``strict_masks``, or offloaded layers, which cannot be written)."""
    counts = {}
    offloaded = []
    for name, layer in layers.items():
        weight, mask, on_device = layer.weight_and_mask()
        if weight is None:
            continue
        bad = int(full_tensor((weight.ne(0) & ~mask.to(weight.device)).sum()))
        if bad:
            counts[name] = bad
            if not on_device:
                offloaded.append(name)
    if not counts:
        return
    total = sum(counts.values())
    detail = ", ".join(f"{name}: {n}" for name, n in counts.items())
    if strict_masks:
        raise ValueError(
            f"strict_masks=True: {total} weights are non-zero at inactive (masked) positions ({detail}); "
            f"a Sparse Wide GPT keeps them exactly zero. Load without strict_masks to zero them."
        )
    if offloaded:
        raise ValueError(
            f"{total} weights are non-zero at inactive (masked) positions ({detail}), and the layers "
            f"{offloaded} are offloaded, where they cannot be repaired. Load without offloading (no device_map, "
            f"or one that fits in memory) to zero them, then save the repaired model."
        )
    for name in counts:
        layers[name].weight.masked_fill_(~layers[name].weight_mask, 0.0)
    logger.warning(
        f"Zeroed {total} weights that were non-zero at inactive (masked) positions ({detail}): a Sparse Wide GPT "
        f"keeps inactive weights exactly zero. Pass strict_masks=True to refuse such checkpoints instead."
    )


# Attention implementations that are causal by themselves when given no mask.
_CAUSAL_KERNELS = ("sdpa", "flash_attention_2", "flash_attention_3")


class SparseWideGPTModel(SparseWideGPTPreTrainedModel):
    def __init__(self, config: SparseWideGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.n_positions, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([SparseWideGPTBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        # A condensed model's config lists its condensed layers: they are built here, so that loading fills them.
        install_condensed_layers(self, config.sparse_format)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """GPT-2's forward. ``output_attentions`` / ``output_hidden_states`` / ``return_dict`` are read from the kwargs or
        the config by the output-capturing decorator. Unlike GPT-2, ``use_cache`` defaults to ``config.use_cache``
        only in eval mode: in training a KV cache would only cost memory and copies."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        kwargs.pop("cache_position", None)
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_seen = cache.get_seq_length() if cache is not None else 0
        packed = False
        if position_ids is None:
            position_ids = torch.arange(past_seen, past_seen + inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = position_ids.unsqueeze(0)
        elif attention_mask is None and past_seen == 0:
            # Padding-free batches (DataCollatorWithFlattening): positions restart at 0 at each document, and a
            # document must not see the ones before it. Detected as transformers does (positions not +1 apart).
            packed = find_packed_sequence_indices(position_ids.expand(inputs_embeds.shape[0], -1)) is not None
        if (
            attention_mask is None
            and cache is None
            and not packed
            and self.config._attn_implementation in _CAUSAL_KERNELS
        ):
            # Training and plain full-sequence forwards: the kernel applies causality itself (is_causal). An
            # explicit mask would force slower SDPA kernels (transformers builds one whenever torch.compile traces).
            causal_mask = None
        elif packed and cache is not None:
            # masking_utils only looks for packing without a cache. An empty dynamic cache holds exactly this
            # forward's keys, so the mask built without it is the same mask, with the documents separated.
            if getattr(cache, "is_compileable", False):
                raise ValueError(
                    "position_ids restart inside a row (packed sequences) but the KV cache is a static one, whose "
                    "masks cannot separate the documents: pass use_cache=False (or a DynamicCache) for packed inputs"
                )
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=None,
                cache=None,
                position_ids=position_ids,
            )
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )

        position_embeds = self.wpe(position_ids).to(inputs_embeds.device)
        hidden_states = self.drop(inputs_embeds + position_embeds)
        for block in self.h:
            hidden_states = block(
                hidden_states,
                attention_mask=causal_mask,
                cache=cache,
                use_cache=use_cache,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class SparseWideGPTForCausalLM(SparseWideGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: SparseWideGPTConfig):
        super().__init__(config)
        self.transformer = SparseWideGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` give the standard shifted causal-LM loss (-100 is ignored), like GPT2LMHeadModel."""
        # return_dict=True: the base model must hand back its output object whatever config.return_dict says
        # (this class's decorator turns the final output into a tuple when asked).
        outputs = self.transformer(
            input_ids,
            cache=cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cache=outputs.cache,
        )


__all__ = [
    "BlockSparseLinear",
    "SparseLinear",
    "SparseWideGPTForCausalLM",
    "SparseWideGPTModel",
    "SparseWideGPTPreTrainedModel",
    "derive_seed",
]
