"""Helpers shared by test modules (fixtures are in conftest.py): tiny configs and checkpoints, launching
processes, running code where the package cannot be imported, and the bad-input harness."""

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_sparse_ift import SparseWideGPTConfig, SparseWideGPTForCausalLM
from hf_sparse_ift.cli import main
from hf_sparse_ift.sparsity.dst import DSTConfig, DSTEngine


def tiny_config(**overrides) -> SparseWideGPTConfig:
    values = dict(
        vocab_size=97,
        n_positions=32,
        n_layer=2,
        n_head=2,
        dense_hidden_size=16,
        sparsity=0.75,
        bos_token_id=0,
        eos_token_id=0,
    )
    values.update(overrides)
    return SparseWideGPTConfig(**values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script, *args, tmp_path, processes=2):
    """`accelerate launch` with N CPU processes (gloo); `--multi_gpu` without GPUs selects MULTI_CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        script,
        *args,
    ]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)


BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_sparse_ift" or name.startswith("hf_sparse_ift."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, _Block())
"""


def run_without_the_package(tmp_path, script: str, *args) -> None:
    """Run `script` in a fresh Python where importing hf_sparse_ift fails, as on a machine without the package."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=tmp_path, env=env, check=True, timeout=300)


FAST = [
    "model.n_layer=2",
    "model.dense_hidden_size=32",
    "model.dense_intermediate_size=128",
    "model.n_head=2",
    "data.seq_len=32",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.eval_batches=2",
    "train.log_interval=2",
    "train.trackers=[]",
    "train.progress_bar=false",
    "dst.update_interval=3",
]


def overrides(out, steps, every):
    return FAST + [
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        f"train.checkpoint_interval={every}",
        f"train.eval_interval={every}",
    ]


def save_tiny(folder: Path, seed: int) -> Path:
    from transformers import AutoTokenizer

    from hf_sparse_ift.resources import builtin_dir

    tok = AutoTokenizer.from_pretrained(builtin_dir() / "tokenizer")
    torch.manual_seed(seed)
    SparseWideGPTForCausalLM(tiny_config(vocab_size=len(tok), n_positions=256)).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "training_config.yaml").write_text("train:\n  output_dir: outputs/tiny-sw75-set\n")
    return folder


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def read_only(folder: Path):
    """A folder nobody can write to, root included (chattr +i; permission bits do not stop root)."""
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        with pytest.raises(OSError):
            (folder / ".probe").write_text("")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def assert_benchmark_rerun_refused(command: list[str], out: Path, env: dict | None = None) -> None:
    """Run a benchmark `command` that has just written its results to `out` once more: it must stop before any work
    with one message naming the files it would replace and the ways out (--tag, --out, --overwrite), and leave the
    bytes and modification time of every file in `out` as they were."""
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir()) if p.is_file()}
    results = [p for p in before if p.suffix in (".json", ".md")]
    assert results, f"no results in {out}"
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    message = proc.stderr.strip().splitlines()[-1]
    for text in [str(p) for p in results] + ["already exist", "--tag", "--out", "--overwrite"]:
        assert text in message, f"{text!r} not in {message!r}"
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stdout  # nothing measured
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir()) if p.is_file()} == before


def run_refused(
    ctx: dict, argv: list[str], expected: list[str], loaders, monkeypatch, capsys, absent: list[str] = ()
) -> int:
    """Run the command (``{name}`` in `argv` / `expected` filled from `ctx`) with every loader in `loaders` failing
    and `ctx["root"]/read-only` unwritable; assert one error sentence holding every `expected` text and none of the
    `absent` ones, no traceback and every file under the root unchanged. Returns the exit code."""
    fill = {k: str(v) for k, v in ctx.items()}
    argv = [a.format(**fill) for a in argv]
    expected = [e.format(**fill) for e in expected]

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    for owner, name in loaders:
        monkeypatch.setattr(owner, name, no_loading)
    root = ctx["root"]
    before = snapshot(root)
    with read_only(root / "read-only"):
        code = main(argv)
    err = capsys.readouterr().err
    assert err.startswith(f"hf-sparse-ift {argv[0]}: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    for text in absent:
        assert text not in err, f"{text!r} in {err!r}"
    assert "Traceback" not in err
    assert snapshot(root) == before
    return code


def make(method, seed=0, interval=2, total=40, mask_seed=0, **dst):
    """A tiny model, AdamW and a DST engine with `method` (the DST tests' set-up)."""
    torch.manual_seed(seed)
    model = SparseWideGPTForCausalLM(tiny_config(mask_seed=mask_seed))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine = DSTEngine(model, opt, DSTConfig(method=method, update_interval=interval, **dst), total_steps=total)
    return model, opt, engine


def train_step(model, opt, engine, generator):
    x = torch.randint(0, 97, (4, 16), generator=generator)
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    return engine.step()
