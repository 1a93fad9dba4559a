"""The derived sizes of every model preset in configs/models, pinned as literals.

A change to the width rounding, the FLOP count or the calibration of the layer sparsity changes these numbers and
fails here, on purpose: checkpoints store the derived values they were built with (config.json), and a preset that
derives other values from the same YAML makes another model. If the change is meant, say so in the commit and update
the literals (they were generated once, from the code of 56f1ffc, and pasted).
"""

import pytest

from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import linear_shapes, model_summary, num_inactive_blocks
from hf_sparse_ift.resources import configs_dir, model_config

GOLDEN = {
    "gpt3-small-dense": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "head_dim": 64,
        "layer_sparsity": 0.0,
        "flop_ratio_to_dense": 1.0,
        "sparse_layer_flop_ratio": None,
    },
    "gpt3-small-sw50": {
        "hidden_size": 1092,
        "intermediate_size": 4344,
        "head_dim": 91,
        "layer_sparsity": 0.5,
        "flop_ratio_to_dense": 1.2034760399950477,
        "sparse_layer_flop_ratio": 1.0071614583333333,
    },
    "gpt3-small-sw50-w64": {
        "hidden_size": 1152,
        "intermediate_size": 4352,
        "head_dim": 96,
        "layer_sparsity": 0.5384615674430941,
        "flop_ratio_to_dense": 1.2366871169661098,
        "sparse_layer_flop_ratio": 1.000000282570168,
    },
    "gpt3-small-sw75": {
        "hidden_size": 1536,
        "intermediate_size": 6144,
        "head_dim": 128,
        "layer_sparsity": 0.75,
        "flop_ratio_to_dense": 1.473373936314589,
        "sparse_layer_flop_ratio": 1.0,
    },
    "gpt3-small-sw90": {
        "hidden_size": 2436,
        "intermediate_size": 9715,
        "head_dim": 203,
        "layer_sparsity": 0.9,
        "flop_ratio_to_dense": 2.030259305312832,
        "sparse_layer_flop_ratio": 1.004083138925058,
    },
    "tiny-sw75": {
        "hidden_size": 192,
        "intermediate_size": 768,
        "head_dim": 48,
        "layer_sparsity": 0.75,
        "flop_ratio_to_dense": 1.5263157894736843,
        "sparse_layer_flop_ratio": 1.0,
    },
    "tiny-sw75-block16": {
        "hidden_size": 192,
        "intermediate_size": 768,
        "head_dim": 48,
        "layer_sparsity": 0.7491319444444446,
        "flop_ratio_to_dense": 1.5263157894736843,
        "sparse_layer_flop_ratio": 1.0,
        "blocks": {
            "q_proj": ((12, 12), 36),
            "k_proj": ((12, 12), 36),
            "v_proj": ((12, 12), 36),
            "o_proj": ((12, 12), 36),
            "fc_in": ((48, 12), 144),
            "fc_out": ((12, 48), 144),
        },
    },
}


def derived(config) -> dict:
    """What a preset derives: widths, head size, layer sparsity, forward FLOPs over the dense model's (whole model,
    and the sparse layers alone: the iso-FLOP property), and for block presets each layer's block grid and active
    blocks."""
    summary = model_summary(config)
    values = {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "head_dim": config.head_dim,
        "layer_sparsity": config.layer_sparsity,
        "flop_ratio_to_dense": summary["flop_ratio_to_dense"],
        # None for a dense preset: it has no sparse layers
        "sparse_layer_flop_ratio": (
            summary["sparse_layer_flops_per_token"] / summary["dense_sparse_layer_flops_per_token"]
            if config.sparsity > 0
            else None
        ),
    }
    if config.uses_blocks:
        rows, cols = config.block_shape
        values["blocks"] = {}
        for name, (d_out, d_in) in linear_shapes(config.hidden_size, config.intermediate_size).items():
            grid = (d_out // rows, d_in // cols)
            inactive = num_inactive_blocks(*grid, config.layer_sparsity, config.block_fan_in == "constant")
            values["blocks"][name] = (grid, grid[0] * grid[1] - inactive)
    return values


def test_every_preset_is_pinned():
    assert sorted(p.stem for p in (configs_dir() / "models").glob("*.yaml")) == sorted(GOLDEN)


@pytest.mark.parametrize("preset", sorted(GOLDEN))
def test_preset_derives_its_pinned_values(preset):
    assert derived(model_config(preset)) == GOLDEN[preset]
