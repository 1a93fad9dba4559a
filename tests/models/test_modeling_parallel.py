"""Tensor-parallel loading (`from_pretrained(..., tp_plan="auto")`) under torchrun with 2 CPU processes (gloo)."""

import json
import os
import subprocess
import sys

import torch
from helpers import free_port, tiny_config

from hf_sparse_ift import SparseWideGPTForCausalLM

HERE = os.path.dirname(__file__)


def test_tensor_parallel_load_gives_the_logits_of_a_plain_load(tmp_path):
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "ckpt")
    torch.save(torch.randint(0, 97, (2, 8)), tmp_path / "ckpt" / "x.pt")
    # 3 heads of size 8 (hidden 24) cannot be split over 2 ranks
    SparseWideGPTForCausalLM(tiny_config(dense_hidden_size=12, n_head=3)).save_pretrained(tmp_path / "odd")
    out = tmp_path / "verdict.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(HERE, "distributed_tp_check.py"),
        str(tmp_path / "ckpt"),
        str(tmp_path / "odd"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads(out.read_text())
    assert verdict == {
        **verdict,
        "ranks": 2,
        "layers": 12,
        "sharded": True,
        "same_masks": True,
        "zero_inactive_grads": True,
    }
    assert verdict["no_grad_diff"] < 1e-5 and verdict["grad_diff"] < 1e-5
    assert verdict["odd_heads_error"] == (
        "UsageError: Tensor parallelism over 2 ranks cannot split n_head=3 attention "
        "heads evenly: use a TP size that divides n_head"
    )
