"""A saved checkpoint loads with trust_remote_code where hf_sparse_ift cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from hf_sparse_ift.models.sparse_wide_gpt.sparse_safetensors import decompress_state_dict

BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_sparse_ift" or name.startswith("hf_sparse_ift."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _Block())
"""

LOADER = """
import sys, torch
try:
    import hf_sparse_ift
    sys.exit("hf_sparse_ift is importable: the test would prove nothing")
except ModuleNotFoundError:
    pass
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
    for code in ("configuration_sparse_wide_gpt.py", "modeling_sparse_wide_gpt.py", "iso_flop.py",
                 "sparse_safetensors.py", "condensed.py"):
        assert (ckpt / code).exists(), code

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    x = torch.randint(0, 97, (2, 12))
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", LOADER, str(ckpt), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
                   cwd=tmp_path, env=env, check=True, timeout=300)

    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["logits"], tiny_model(x).logits)
    # save_pretrained writes the compressed layout (packed mask bits): decode it to compare masks
    stored = decompress_state_dict(load_file(ckpt / "model.safetensors"))
    saved = {k: v for k, v in stored.items() if k.endswith("weight_mask")}
    assert set(out["masks"]) == set(saved) and len(saved) == 12
    for k, v in saved.items():
        assert torch.equal(out["masks"][k], v)
