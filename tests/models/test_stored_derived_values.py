"""A checkpoint's stored derived sizes (config.json: widths, head size, layer_sparsity) are its truth: they load as
stored, even where today's rounding or calibration gives other numbers, with a warning when the sparse layers' FLOPs
differ by more than STORED_FLOPS_RTOL. Sizes given by hand are still derived, and checked when given alone."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as hf_logging

from hf_sparse_ift import SparseWideGPTConfig, SparseWideGPTForCausalLM
from hf_sparse_ift.errors import UsageError
from hf_sparse_ift.models.sparse_wide_gpt import configuration_sparse_wide_gpt
from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import STORED_FLOPS_RTOL, count_flops

CHECKPOINTS = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
LOGGER = hf_logging.get_logger(configuration_sparse_wide_gpt.__name__)


def fixture_with(tmp_path: Path, name: str, **stored) -> Path:
    """A copy of fixture `name` whose config.json stores other derived values."""
    folder = tmp_path / name
    shutil.copytree(CHECKPOINTS / name, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(stored)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def sparse_flops(config: SparseWideGPTConfig) -> float:
    return count_flops(config.shape()).sparse_matmul


def test_a_stored_layer_sparsity_1e_9_from_todays_derivation_loads_silently_as_stored(tmp_path):
    derived = SparseWideGPTConfig.from_pretrained(CHECKPOINTS / "width-multiple").layer_sparsity
    assert derived == 0.555338541666667  # what the fixture stores is what today's code derives
    folder = fixture_with(tmp_path, "width-multiple", layer_sparsity=derived + 1e-9)
    with CaptureLogger(LOGGER) as captured:
        model = SparseWideGPTForCausalLM.from_pretrained(folder).eval()
    assert captured.out == ""
    assert model.config.layer_sparsity == derived + 1e-9
    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=0, atol=1e-6)
    model.config.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["layer_sparsity"] == derived + 1e-9


def test_a_stored_layer_sparsity_5_percent_off_loads_as_stored_with_a_warning_naming_both_figures(tmp_path):
    derived = SparseWideGPTConfig.from_pretrained(CHECKPOINTS / "width-multiple")
    stored = derived.layer_sparsity * 1.05
    folder = fixture_with(tmp_path, "width-multiple", layer_sparsity=stored)
    with CaptureLogger(LOGGER) as captured:
        model = SparseWideGPTForCausalLM.from_pretrained(folder).eval()
    assert model.config.layer_sparsity == stored
    have, want = sparse_flops(model.config), sparse_flops(derived)
    assert abs(have / want - 1) > STORED_FLOPS_RTOL
    assert captured.out.count("\n") == 1, captured.out
    for figure in (f"{have:.6g} FLOPs per token", f"{have / want - 1:+.2%}", f"from the {want:.6g}"):
        assert figure in captured.out, (figure, captured.out)
    assert f"layer_sparsity={stored!r}" in captured.out and f"layer_sparsity={derived.layer_sparsity!r}" in captured.out
    assert "Using the stored sizes" in captured.out
    # the masks are the checkpoint's, so the model computes what it computed when saved
    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=0, atol=1e-6)


def test_stored_widths_that_todays_rounding_would_not_give_are_used_as_stored():
    saved = SparseWideGPTConfig(dense_hidden_size=16, n_head=2, sparsity=0.5, width_multiple=8).to_dict()
    saved.update(hidden_size=26, intermediate_size=100, head_dim=13)
    with CaptureLogger(LOGGER) as captured:
        config = SparseWideGPTConfig.from_dict(saved)
    assert (config.hidden_size, config.intermediate_size, config.head_dim) == (26, 100, 13)
    assert (
        "hidden_size=26, intermediate_size=100" in captured.out
        and "hidden_size=24, intermediate_size=96" in captured.out
    )


def test_stored_sizes_that_do_not_make_a_model_are_refused():
    saved = SparseWideGPTConfig(dense_hidden_size=16, n_head=2, sparsity=0.5, width_multiple=8).to_dict()
    with pytest.raises(
        ValueError, match=r"^SparseWideGPTConfig.head_dim=11 is invalid: expected hidden_size / n_head = 12$"
    ):
        SparseWideGPTConfig.from_dict({**saved, "head_dim": 11})
    with pytest.raises(
        ValueError, match=r"^SparseWideGPTConfig.hidden_size=25 is invalid: must be a multiple of n_head=2$"
    ):
        SparseWideGPTConfig.from_dict({**saved, "hidden_size": 25})
    with pytest.raises(
        ValueError, match=r"^SparseWideGPTConfig.layer_sparsity=1.0 is invalid: expected a number in \[0, 1\)$"
    ):
        SparseWideGPTConfig.from_dict({**saved, "layer_sparsity": 1.0})


def test_a_stored_layer_sparsity_that_changes_the_active_block_count_is_refused_by_the_shapes(tmp_path):
    """Block layers store only their active blocks: a layer sparsity giving another count cannot hold the tensors."""
    folder = fixture_with(tmp_path, "block", layer_sparsity=0.6)
    with pytest.raises(UsageError, match=r"tensors of the checkpoint do not have the shapes its config\.json gives"):
        SparseWideGPTForCausalLM.from_pretrained(folder)


def test_sizes_given_by_hand_are_derived_and_checked_when_given_alone():
    config = SparseWideGPTConfig(dense_hidden_size=16, n_head=2, sparsity=0.5, width_multiple=8)
    assert (config.hidden_size, config.intermediate_size, config.layer_sparsity) == (24, 96, 0.555338541666667)
    message = "it is derived from the dense sizes and sparsity, which give 0.555338541666667"
    with pytest.raises(ValueError, match=re.escape(f"SparseWideGPTConfig.layer_sparsity=0.5555 is invalid: {message}")):
        SparseWideGPTConfig(dense_hidden_size=16, n_head=2, sparsity=0.5, width_multiple=8, layer_sparsity=0.5555)
