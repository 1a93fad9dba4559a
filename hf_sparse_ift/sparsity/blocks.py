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

from ..models.sparse_wide_gpt import SparseWideGPTConfig, SparseWideGPTForCausalLM
from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import _DERIVED_KEYS
from ..models.sparse_wide_gpt.modeling_sparse_wide_gpt import BlockSparseLinear
from .masks import sparse_layers

__all__ = ["to_block_model", "to_masked_model"]


def to_masked_model(model: SparseWideGPTForCausalLM) -> SparseWideGPTForCausalLM:
    """The masked model with the weights and masks of the block model `model`."""
    if not model.config.uses_blocks:
        raise ValueError(
            f"the model's sparse layers are already masked (sparsity_block={model.config.sparsity_block!r}, "
            f"sparsity={model.config.sparsity}): there are no block layers to convert"
        )
    config = _config_like(
        model.config, sparsity_block=1, block_fan_in="any", width_multiple=model.config.width_multiple
    )
    return _convert(model, config, BlockSparseLinear.to_masked)


def to_block_model(
    model: SparseWideGPTForCausalLM, sparsity_block: int | tuple[int, int] | list[int], block_fan_in: str = "any"
) -> SparseWideGPTForCausalLM:
    """The block model with the weights and masks of the masked model `model`; every mask must be made of whole
    blocks of `sparsity_block` (e.g. one that `to_masked_model` wrote)."""
    if model.config.uses_blocks:
        raise ValueError(
            f"the model's sparse layers are already block-sparse (sparsity_block={model.config.sparsity_block!r}): "
            f"convert it with to_masked_model first to change its block size"
        )
    if not sparse_layers(model):
        raise ValueError(f"the model has no sparse layers (sparsity={model.config.sparsity}): nothing to convert")
    config = _config_like(model.config, sparsity_block=sparsity_block, block_fan_in=block_fan_in)
    return _convert(
        model, config, lambda layer: BlockSparseLinear.from_masked(layer, config.block_shape, config.block_fan_in)
    )


def _config_like(config: SparseWideGPTConfig, **changes) -> SparseWideGPTConfig:
    values = {k: v for k, v in config.to_dict().items() if k not in _DERIVED_KEYS and k != "sparse_format"}
    if changes.get("width_multiple", values.get("width_multiple")) is None:
        values.pop("width_multiple", None)  # the block size is then the default width multiple
    new = SparseWideGPTConfig(**{**values, **changes})
    if (new.hidden_size, new.intermediate_size) != (config.hidden_size, config.intermediate_size):
        raise ValueError(
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
            raise ValueError(
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
