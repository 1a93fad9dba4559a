"""End-to-end pretraining: the real CLI on the built-in data, a tiny model, a few steps."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import accelerate_launch, overrides
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sparse_ift import BlockSparseLinear, SparseWideGPTForCausalLM
from hf_sparse_ift.errors import UsageError
from hf_sparse_ift.models.sparse_wide_gpt import block_sparse_cpu
from hf_sparse_ift.sparsity import sparse_layers
from hf_sparse_ift.training import run as run_module
from hf_sparse_ift.training.config import load_pretrain_config
from hf_sparse_ift.training.loop import NonFiniteLossError, pretrain


def cli(*args):
    return [sys.executable, "-m", "hf_sparse_ift.cli", *args]


def test_short_run_lowers_loss_writes_loadable_checkpoints_and_keeps_last_k(tmp_path):
    out = tmp_path / "run"
    cfg = load_pretrain_config(
        "pretrain-tiny", overrides(out, 12, 4) + ["train.keep_checkpoints=2", "train.trackers=[tensorboard]"]
    )
    summary = pretrain(cfg)
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 8 * 32
    assert [Path(p).name for p in summary["checkpoints"]] == ["checkpoint-8", "checkpoint-12"]
    assert summary["val_loss"][-1][1] < summary["val_loss"][0][1]
    assert not list(out.glob("*.tmp"))
    export = out / "checkpoint-12" / "hf"
    model = AutoModelForCausalLM.from_pretrained(export)
    for m in sparse_layers(model).values():
        assert torch.count_nonzero(m.weight[~m.weight_mask]) == 0
    assert (export / "tokenizer.json").exists() and (export / "README.md").exists()
    # The tokenizer truncates to the model's context (the preset's 128 positions), not to its own default of 2048.
    assert AutoTokenizer.from_pretrained(export).model_max_length == model.config.n_positions == 128
    assert list((out / "hf-sparse-ift").rglob("events.out.tfevents*"))  # TensorBoard logs


def test_block_sparse_preset_trains_and_exports_a_block_model(tmp_path):
    out = tmp_path / "block"
    # FAST's widths 64 / 256 are 4 / 16 blocks of 16; DST (set) updates the blocks at steps 3 and 6.
    cfg = load_pretrain_config("pretrain-tiny", overrides(out, 6, 6) + ["model.preset=tiny-sw75-block16"])
    assert cfg.model_config().sparsity_block == 16
    # Initial block masks come from the config's mask_seed: the same model built here starts where the run starts.
    initial = {k: m.block_mask for k, m in sparse_layers(SparseWideGPTForCausalLM(cfg.model_config())).items()}
    summary = pretrain(cfg)
    assert summary["steps"] == 6
    resolved = summary["run_config"]["resolved"]  # the kernel auto chose, in every record
    assert resolved["block_kernel"] == {"cpu": "cpu"} and "model.block_kernel=auto: cpu on cpu" in resolved["decisions"]
    # and which code that kernel ran: the built library (path, hash, threads) or the torch path
    info = block_sparse_cpu.kernel_info()
    want = "torch path" if info is None else f"native kernel {info['path']}"
    assert any(d.startswith("block-sparse layers on CPU compute with") and want in d for d in resolved["decisions"])
    # blocks the native kernel does not take run the torch path, and the record says so even where it is built
    refused = run_module._cpu_block_kernel_decision((8, 8))
    assert "torch path" in refused and "8x8" in refused, refused
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-6" / "hf")
    layers = sparse_layers(model)
    assert len(layers) == 12 and all(isinstance(m, BlockSparseLinear) for m in layers.values())
    assert all(m.sparsity_block == (16, 16) and m.n_active == int(initial[k].sum()) for k, m in layers.items())
    assert any(not torch.equal(m.block_mask, initial[k]) for k, m in layers.items())  # DST moved blocks
    assert all(torch.isfinite(m.weight_blocks).all() for m in layers.values())
    assert "block-sparse (`sparsity_block` 16)" in (out / "checkpoint-6" / "hf" / "README.md").read_text()


def test_a_named_block_kernel_is_recorded_or_refused_before_any_work(tmp_path):
    from hf_sparse_ift.training.run import resolve_run

    def cfg(kernel, out):
        block = ["model.preset=tiny-sw75-block16", f"model.block_kernel={kernel}"]
        return load_pretrain_config("pretrain-tiny", overrides(out, 2, 2) + block)

    run = resolve_run(cfg("reference", tmp_path / "reference"), 1)
    assert run.to_dict()["resolved"]["block_kernel"] == {"cpu": "reference"}
    assert not any("block_kernel" in d for d in run.decisions)  # named, not decided
    out = tmp_path / "triton"
    with pytest.raises(UsageError, match=r"kernel='triton' cannot compute .*TRITON_INTERPRET=1"):
        pretrain(cfg("triton", out))
    assert not out.exists()


def test_existing_run_needs_resume_and_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        pretrain(load_pretrain_config("pretrain-tiny", overrides(tmp_path / "a", 2, 2)), resume=True)
    pretrain(load_pretrain_config("pretrain-tiny", overrides(tmp_path / "b", 2, 2)))
    with pytest.raises(FileExistsError, match="pass --resume"):
        pretrain(load_pretrain_config("pretrain-tiny", overrides(tmp_path / "b", 2, 2)))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nan"
    cfg = load_pretrain_config("pretrain-tiny", overrides(out, 10, 1) + ["optim.lr=1.0e+30", "optim.grad_clip=0"])
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step \d+: stopping. The last good checkpoint is"):
        pretrain(cfg)
    kept = sorted(out.glob("checkpoint-*"))
    assert kept and not list(out.glob("*.tmp"))
    assert AutoModelForCausalLM.from_pretrained(kept[-1] / "hf") is not None


def final_state(ckpt: Path) -> dict:
    state = {f"model.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    optim = torch.load(ckpt / "optimizer.bin", weights_only=False)
    for pid, s in optim["state"].items():
        for k, v in s.items():
            state[f"optim.{pid}.{k}"] = v
    return state


@pytest.mark.parametrize(
    ("layout", "model", "index_key"),
    [("masked", [], "weight_mask"), ("block", ["model.preset=tiny-sw75-block16"], "block_col_indices")],
)
def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, layout, model, index_key):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    steps, every = 30, 5
    straight = tmp_path / "straight"
    subprocess.run(
        cli("pretrain", *overrides(straight, steps, every), *model),
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        cli("pretrain", *overrides(killed, steps, every), *model),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoint-15").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / f"checkpoint-{steps}").exists()
    resumed = subprocess.run(
        cli("pretrain", "--resume", *overrides(killed, steps, every), *model),
        env=env,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    a, b = final_state(straight / f"checkpoint-{steps}"), final_state(killed / f"checkpoint-{steps}")
    assert a.keys() == b.keys() and any(k.endswith(index_key) for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((straight / "train_summary.json").read_text())
    sb = json.loads((killed / "train_summary.json").read_text())
    assert sa["val_loss"][-1] == sb["val_loss"][-1]


def test_two_process_training_keeps_masks_identical(tmp_path):
    out = tmp_path / "ddp"
    script = str(Path(__file__).resolve().parents[2] / "scripts" / "pretrain.py")
    proc = accelerate_launch(script, "--config", "pretrain-tiny", *overrides(out, 12, 6), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["mask_checks"] == 2  # updates at steps 3 and 6 (< 0.75·12 = 9)
    data = torch.load(out / "checkpoint-12" / "custom_checkpoint_2.pkl", weights_only=False)
    assert len(data["ranks"]) == 2 and data["ranks"][0] != data["ranks"][1]  # each rank its own data position
