"""Checkpoints saved by earlier code still load, with their logits and masks (tests/fixtures/checkpoints/README.md).

Every folder under tests/fixtures/checkpoints is a tiny model saved by ``save_pretrained`` at some commit, in one of the
saved formats, with the input, logits and masks it had when saved (``expected.safetensors``). A change that orphans a
user's checkpoint (a renamed tensor, a changed layout, a config that no longer loads) fails here. Fixtures are never
regenerated: when a format changes, add a new one with tests/fixtures/make_checkpoints.py.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_without_the_package
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_sparse_ift import SparseWideGPTForCausalLM  # importing the package registers it with the Auto classes
from hf_sparse_ift.models.sparse_wide_gpt import BlockSparseLinear, SparseLinear
from hf_sparse_ift.sparsity.checkpoint_layouts import CondensedLinear

CHECKPOINTS = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
_spec = importlib.util.spec_from_file_location("make_checkpoints", CHECKPOINTS.parent / "make_checkpoints.py")
make_checkpoints = sys.modules.setdefault("make_checkpoints", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(make_checkpoints)
SAVED = sorted(p.name for p in CHECKPOINTS.iterdir() if p.is_dir())
# The fixtures made at 56f1ffc, named here as well as in make_checkpoints.py: deleting one must fail too.
MADE_AT_56F1FFC = (
    "masked-plain",
    "masked-compressed",
    "width-multiple",
    "block",
    "block-constant-fan-in",
    "srigl-constant-fan-in",
    "condensed-csr",
    "condensed-padded",
)
DERIVED = ("hidden_size", "intermediate_size", "head_dim", "layer_sparsity")
# The logits are compared to 1e-6 (about 8 float32 ulps at the logits' size, |logit| <= 1.2), not bit for bit: they
# were computed on one CPU, and matmul kernels (BLAS for each instruction set, the block-sparse and condensed kernels)
# may sum in another order elsewhere or in later releases. A tensor loaded wrongly moves them by far more.
LOGITS_ATOL = 1e-6


def test_every_fixture_is_present_and_known():
    assert set(MADE_AT_56F1FFC) <= set(SAVED)
    assert set(SAVED) == set(make_checkpoints.FIXTURES)
    for name in SAVED:
        with safe_open(CHECKPOINTS / name / "expected.safetensors", "pt") as f:
            assert f.metadata()["fixture"] == name
            assert len(f.metadata()["commit"]) == 40


def expected_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "expected.safetensors")


def saved_masks(expected: dict, model) -> dict[str, torch.Tensor]:
    """The masks in ``expected.safetensors``, unpacked to the shapes of the model's layers."""
    masks = {}
    for key, bits in expected.items():
        kind, _, layer = key.partition(".")
        if kind == "weight_mask":
            masks[key] = make_checkpoints.unpack_mask(bits, model.get_submodule(layer).in_features)
        elif kind == "block_mask":
            masks[key] = make_checkpoints.unpack_mask(bits, model.get_submodule(layer).block_grid[1])
    return masks


def model_masks(model) -> dict[str, torch.Tensor]:
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, CondensedLinear):
            masks[f"weight_mask.{name}"] = module.to_dense()[1]
        elif isinstance(module, (SparseLinear, BlockSparseLinear)):
            masks[f"weight_mask.{name}"] = module.weight_mask
        if isinstance(module, BlockSparseLinear):
            masks[f"block_mask.{name}"] = module.block_mask
            # only the active blocks are stored, as many as the saved block mask has
            assert module.weight_blocks.shape[0] == module.n_active == int(module.block_mask.sum()), name
    return masks


@pytest.mark.parametrize("name", SAVED)
def test_fixture_loads_with_its_logits_and_masks(name):
    folder = CHECKPOINTS / name
    expected = expected_of(folder)
    stored = json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model) is SparseWideGPTForCausalLM  # the package's class, not the fixture's remote code
    # the derived sizes stored in the checkpoint are the ones the model is built with
    for key in DERIVED:
        assert getattr(model.config, key) == stored[key], key
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=LOGITS_ATOL)
    saved, held = saved_masks(expected, model), model_masks(model)
    assert set(held) == set(saved) and len([k for k in saved if k.startswith("weight_mask.")]) == 12
    for key, mask in saved.items():
        assert torch.equal(held[key], mask), key
    condensed = [m for m in model.modules() if isinstance(m, CondensedLinear)]
    assert len(condensed) == (12 if name.startswith("condensed-") else 0)


def test_srigl_fixtures_have_a_constant_fan_in_and_ablated_neurons():
    """What makes them worth keeping: the masks SRigL writes, not a random mask."""
    for name in ("srigl-constant-fan-in", "condensed-padded"):
        model = SparseWideGPTForCausalLM.from_pretrained(CHECKPOINTS / name)
        fan_ins = [mask.sum(dim=1) for mask in saved_masks(expected_of(CHECKPOINTS / name), model).values()]
        assert all(bool((f[f > 0] == f[f > 0][0]).all()) for f in fan_ins), name
        assert any(bool((f == 0).any()) for f in fan_ins), name
    padded = SparseWideGPTForCausalLM.from_pretrained(CHECKPOINTS / "condensed-padded")
    assert all(m.fan_in is not None for m in padded.modules() if isinstance(m, CondensedLinear))


# One subprocess: about 5 s importing torch and transformers, 1-2 s more for each fixture loaded.
REMOTE = ("masked-compressed",)
REMOTE_LOADER = """
import sys, torch
from pathlib import Path
try:
    import hf_sparse_ift
    sys.exit("hf_sparse_ift is importable: the test would prove nothing")
except ModuleNotFoundError:
    pass
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
results = {}
for folder in map(Path, sys.argv[2:]):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "hf_sparse_ift" not in type(model).__module__, type(model).__module__
    with torch.no_grad():
        results[folder.name] = model(load_file(folder / "expected.safetensors")["input_ids"]).logits
torch.save(results, sys.argv[1])
"""


def test_a_fixture_loads_with_its_own_remote_code_without_the_package(tmp_path):
    """The remote code saved beside a checkpoint (the model files of the commit that saved it) runs on today's
    transformers. One fixture, the compressed layout (whose decoding is a conversion registered with transformers)."""
    run_without_the_package(tmp_path, REMOTE_LOADER, tmp_path / "out.pt", *(CHECKPOINTS / name for name in REMOTE))
    out = torch.load(tmp_path / "out.pt")
    assert sorted(out) == sorted(REMOTE)
    for name, logits in out.items():
        torch.testing.assert_close(logits, expected_of(CHECKPOINTS / name)["logits"], rtol=0, atol=LOGITS_ATOL)
