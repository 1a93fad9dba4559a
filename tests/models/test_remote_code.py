"""A saved checkpoint loads with trust_remote_code where hf_sparse_ift cannot be imported."""

import ast
import json
from pathlib import Path

import torch
from helpers import run_without_the_package, tiny_config
from safetensors.torch import load_file

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.models.sparse_wide_gpt.compat import MINIMUM_VERSIONS
from hf_sparse_ift.models.sparse_wide_gpt.sparse_safetensors import decompress_state_dict

LOADER = """
import sys, torch
try:
    import hf_sparse_ift
    sys.exit("hf_sparse_ift is importable: the test would prove nothing")
except ModuleNotFoundError:
    pass
import subprocess
def refuse(self, args, *a, **k):  # remote code never compiles (or starts) anything
    raise AssertionError(f"a process was started: {args}")
subprocess.Popen.__init__ = refuse
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "hf_sparse_ift" not in type(model).__module__, type(model).__module__
x = torch.load(sys.argv[2])
torch.save({"logits": model(x).logits,
            "masks": {k: v for k, v in model.state_dict().items() if k.endswith("weight_mask")}}, sys.argv[3])
"""


def test_trust_remote_code_without_the_package(tiny_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_model.save_pretrained(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_sparse_wide_gpt.SparseWideGPTForCausalLM"
    for code in (
        "configuration_sparse_wide_gpt.py",
        "modeling_sparse_wide_gpt.py",
        "iso_flop.py",
        "sparse_safetensors.py",
        "condensed_linear.py",
        "condensed_kernel.py",
        "layer_utils.py",
        "compat.py",
    ):
        assert (ckpt / code).exists(), code

    x = torch.randint(0, 97, (2, 12))
    torch.save(x, tmp_path / "x.pt")
    run_without_the_package(tmp_path, LOADER, ckpt, tmp_path / "x.pt", tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["logits"], tiny_model(x).logits)
    # save_pretrained writes the compressed layout (packed mask bits): decode it to compare masks
    stored = decompress_state_dict(load_file(ckpt / "model.safetensors"))
    saved = {k: v for k, v in stored.items() if k.endswith("weight_mask")}
    assert set(out["masks"]) == set(saved) and len(saved) == 12
    for k, v in saved.items():
        assert torch.equal(out["masks"][k], v)


BLOCK_LOADER = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "hf_sparse_ift" not in type(model).__module__, type(model).__module__
x = torch.load(sys.argv[2])
torch.save({"logits": model(x).logits, "generated": model.generate(x[:1, :4], max_new_tokens=5, do_sample=False),
            "state": model.state_dict()}, sys.argv[3])
"""


def test_block_model_loads_with_trust_remote_code_without_the_package(tmp_path):
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config(dense_hidden_size=32, sparsity_block=8)).eval()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    for code in (
        "block_sparse.py",
        "block_sparse_layout.py",
        "block_sparse_cpu.py",
        "block_sparse_bsr.py",
        "native_kernels.py",
    ):
        assert (ckpt / code).exists(), code  # the kernels travel with the model code
    x = torch.randint(0, 97, (2, 12))
    torch.save(x, tmp_path / "x.pt")
    run_without_the_package(tmp_path, BLOCK_LOADER, ckpt, tmp_path / "x.pt", tmp_path / "out.pt")
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        # to fp32 rounding: once (2026-12-03, a full parallel run) the two processes' logits differed in their last
        # bits; not reproduced in one process across thread counts and allocations, cause not found. The generated
        # tokens and every tensor of the state stay exact.
        torch.testing.assert_close(out["logits"], model(x).logits, rtol=0, atol=1e-5)
    assert torch.equal(out["generated"], model.generate(x[:1, :4], max_new_tokens=5, do_sample=False))
    for key, value in model.state_dict().items():
        assert torch.equal(out["state"][key], value), key


REFUSED = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
except ImportError as err:
    open(sys.argv[2], "w").write(str(err))
"""


def test_remote_code_on_an_older_transformers_stops_with_one_sentence(tiny_model, tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_model.save_pretrained(ckpt)
    # A dist-info ahead of the real one on sys.path: importlib.metadata reports transformers 5.23.0.
    fake = tmp_path / "site" / "transformers-5.23.0.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.23.0\n")
    run_without_the_package(tmp_path, REFUSED, ckpt, tmp_path / "error.txt")
    floor = MINIMUM_VERSIONS["transformers"]
    assert (tmp_path / "error.txt").read_text() == (
        f"Sparse Wide GPT (hf-sparse-ift) needs 'transformers>={floor}' but found transformers 5.23.0: "
        f"run pip install --upgrade 'transformers>={floor}'"
    )


MODEL_FOLDER = Path(__file__).resolve().parents[2] / "hf_sparse_ift" / "models" / "sparse_wide_gpt"


def test_the_model_folder_starts_no_process():
    """The model folder is copied into every checkpoint as remote code: no file there imports subprocess or calls
    what starts a process (building kernels lives in hf_sparse_ift/kernels/build.py)."""
    starters = {"system", "popen", "spawnl", "spawnv", "execv", "execl", "fork", "posix_spawn", "startfile"}
    files = sorted(MODEL_FOLDER.glob("*.py"))
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in ("subprocess", "pty") for a in node.names), path.name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in ("subprocess", "pty"), path.name
            elif isinstance(node, ast.Attribute):
                assert not (node.attr in starters or node.attr.startswith(("spawn", "exec"))), (path.name, node.attr)
            elif isinstance(node, ast.Name):
                assert node.id != "subprocess", path.name
