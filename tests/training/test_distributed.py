import json
import os
import subprocess
import sys

import pytest
from helpers import accelerate_launch, free_port

HERE = os.path.dirname(__file__)


@pytest.mark.parametrize(
    ("method", "layout"), [("set", "masked"), ("rigl", "masked"), ("srigl", "masked"), ("rigl", "block")]
)
def test_masks_identical_on_all_ranks_after_many_updates(method, layout, tmp_path):
    out = tmp_path / "verdict.json"
    script = os.path.join(HERE, "distributed_dst_check.py")
    proc = accelerate_launch(script, method, str(out), layout, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads(out.read_text())
    assert verdict == {**verdict, "ranks": 2, "same_masks": True, "same_params": True, "updates": 14}
    assert verdict["changed_positions"] > 0


@pytest.mark.parametrize(("method", "layout"), [("set", "masked"), ("rigl", "masked"), ("rigl", "block")])
def test_dst_under_fsdp2_shards_keeps_masks_identical_and_inactive_weights_zero(method, layout, tmp_path):
    out = tmp_path / "verdict.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(HERE, "distributed_fsdp_check.py"),
        method,
        str(out),
        layout,
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdict = json.loads(out.read_text())
    assert verdict == {
        **verdict,
        "ranks": 2,
        "same_masks": True,
        "sharded": True,
        "zero_weights": True,
        "zero_state": True,
        "constant_counts": True,
        "updates": 10,
    }
    assert verdict["changed_positions"] > 0
