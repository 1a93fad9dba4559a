"""Conversion of whole models between the block layout (`BlockSparseLinear`: active blocks plus a block index) and
the masked layout (`SparseLinear`: a dense weight plus a boolean mask).

    masked = to_masked_model(block_model)                        # same outputs, every weight stored
    block_model = to_block_model(masked, sparsity_block=64)      # the mask must be made of whole 64x64 blocks

Both keep every weight bit for bit; the other parameters and buffers are copied unchanged. The new model's config
differs only in ``sparsity_block`` / ``block_fan_in`` (and so in its derived ``layer_sparsity``): its widths must be
those of the model converted, and each layer must hold exactly the active weights its config gives it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UsageError
from ..models.sparse_wide_gpt import SparseWideGPTConfig, SparseWideGPTForCausalLM
from ..models.sparse_wide_gpt.sparse_layers import BlockSparseLinear, SparseLinear, block_grid_of
from .masks import sparse_layers

__all__ = ["block_layer_from_masked", "masked_layer_from_block", "to_block_model", "to_masked_model"]


def to_masked_model(model: SparseWideGPTForCausalLM) -> SparseWideGPTForCausalLM:
    """The masked model with the weights and masks of the block model `model`."""
    if not model.config.uses_blocks:
        raise UsageError(
            f"the model's sparse layers are already masked (sparsity_block={model.config.sparsity_block!r}, "
            f"sparsity={model.config.sparsity}): there are no block layers to convert"
        )
    config = _config_like(model.config, sparsity_block=1, block_fan_in="any")
    return _convert(model, config, masked_layer_from_block)


def to_block_model(
    model: SparseWideGPTForCausalLM, sparsity_block: int | tuple[int, int] | list[int], block_fan_in: str = "any"
) -> SparseWideGPTForCausalLM:
    """The block model with the weights and masks of the masked model `model`; every mask must be made of whole
    blocks of `sparsity_block` (e.g. one that `to_masked_model` wrote)."""
    if model.config.uses_blocks:
        raise UsageError(
            f"the model's sparse layers are already block-sparse (sparsity_block={model.config.sparsity_block!r}): "
            f"convert it with to_masked_model first to change its block size"
        )
    if not sparse_layers(model):
        raise UsageError(f"the model has no sparse layers (sparsity={model.config.sparsity}): nothing to convert")
    config = _config_like(model.config, sparsity_block=sparsity_block, block_fan_in=block_fan_in)
    return _convert(
        model,
        config,
        lambda layer: block_layer_from_masked(layer, config.block_shape, config.block_fan_in, config.block_kernel),
    )


def _config_like(config: SparseWideGPTConfig, **changes) -> SparseWideGPTConfig:
    # A width_multiple of None (paper widths) becomes the block size for a block config; widths are checked below.
    new = config.replace(**changes)
    if (new.hidden_size, new.intermediate_size) != (config.hidden_size, config.intermediate_size):
        raise UsageError(
            f"with {changes} the config derives widths {new.hidden_size}/{new.intermediate_size}, not the model's "
            f"{config.hidden_size}/{config.intermediate_size}: the model cannot be converted to that layout (its "
            f"widths must be multiples of the block size)"
        )
    return new


def _active_weights(layer: nn.Module) -> int:
    return int(layer.weight_mask.sum())


@torch.no_grad()
def _convert(
    model: SparseWideGPTForCausalLM, config: SparseWideGPTConfig, convert_layer: Callable[[nn.Module], nn.Module]
) -> SparseWideGPTForCausalLM:
    reference = next(model.parameters())
    target = SparseWideGPTForCausalLM(config).to(device=reference.device, dtype=reference.dtype)
    layers = sparse_layers(model)
    for name, layer in layers.items():
        converted = convert_layer(layer)
        expected = _active_weights(target.get_submodule(name))
        if _active_weights(converted) != expected:
            raise UsageError(
                f"{name} has {_active_weights(converted)} active weights; a layer of the converted config "
                f"(sparsity_block={config.sparsity_block!r}, layer_sparsity={config.layer_sparsity:.6g}) holds "
                f"{expected}"
            )
        target.set_submodule(name, converted)
    rest = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in layers}
    missing, unexpected = target.load_state_dict(rest, strict=False)
    left = [k for k in missing if k.rpartition(".")[0] not in layers]
    if left or unexpected:
        raise RuntimeError(f"conversion left parameters unset {left} or unused {unexpected}")
    return target.train(model.training)


@torch.no_grad()
@torch.no_grad()
def block_layer_from_masked(
    linear: SparseLinear, sparsity_block: tuple[int, int], block_fan_in: str = "any", kernel: str = "auto"
) -> BlockSparseLinear:
    """The block layer holding exactly the weights of `linear`, whose mask must be made of whole blocks; it computes
    with `kernel` (see `BlockSparseLinear`)."""
    rows, cols = sparsity_block
    out_features, in_features = linear.weight.shape
    grid_rows, grid_cols = block_grid_of(out_features, in_features, sparsity_block)
    per_block = linear.weight_mask.reshape(grid_rows, rows, grid_cols, cols).sum(dim=(1, 3))
    partial = int(((per_block > 0) & (per_block < rows * cols)).sum())
    if partial:
        raise UsageError(
            f"{partial} of the {grid_rows * grid_cols} blocks of {rows}x{cols} in this layer's mask are only "
            f"partly active: a mask made of whole blocks is needed to store the layer block by block"
        )
    block_mask = per_block > 0
    counts = block_mask.sum(dim=1)
    if block_fan_in == "constant" and not bool((counts == counts[0]).all()):
        raise UsageError(
            f"block_fan_in='constant' needs the same number of active blocks in every block-row; this mask has "
            f"between {int(counts.min())} and {int(counts.max())}"
        )
    n_active = int(block_mask.sum())
    block = BlockSparseLinear(
        in_features,
        out_features,
        bias=linear.bias is not None,
        sparsity_block=sparsity_block,
        sparsity=1.0 - n_active / block_mask.numel(),
        block_fan_in=block_fan_in,
        mask_seed=linear.mask_seed,
        residual_projection=linear.residual_projection,
        kernel=kernel,
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
def masked_layer_from_block(layer: BlockSparseLinear) -> SparseLinear:
    """The `SparseLinear` with the weights and mask of the block layer `layer` (inactive weights +0.0)."""
    weight = layer.weight_blocks
    linear = SparseLinear(
        layer.in_features,
        layer.out_features,
        bias=layer.bias is not None,
        sparsity=layer.sparsity,
        mask_seed=layer.mask_seed,
        residual_projection=layer.residual_projection,
        device=weight.device,
        dtype=weight.dtype,
    )
    linear.weight_mask.copy_(layer.weight_mask)
    linear._mask_source = "checkpoint"
    linear.weight.copy_(layer.dense_weight())
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    return linear
