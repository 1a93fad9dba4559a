"""The Triton kernel of `block_sparse_linear` without a GPU: its interpreter run (a subprocess), a compile-only check
for sm_80 and sm_90, the kernel choice, and loading without triton."""

import io
import os
import re
import subprocess
import sys
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_sparse_ift.models.sparse_wide_gpt import block_sparse, block_sparse_triton
from hf_sparse_ift.models.sparse_wide_gpt.block_sparse import KERNEL_CHOICES, block_sparse_linear, resolve_kernel

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("triton_interpreter_cases.py")


def test_kernels_in_the_interpreter():
    """triton_interpreter_cases.py under TRITON_INTERPRET=1, in its own process so the setting reaches no other test."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(CASES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ passed in [\d.]+s ?=*", summary), summary  # nothing skipped, failed or warned


# --- compile-only: the kernels as the JIT would build them for an A100 (sm_80) and an H100/H200 (sm_90) ----------
def launches(dtype, block, mode=None):
    """The (kernel, args, meta) of one forward, input-gradient and block-gradient call at a layer shape of
    GPT-3 Small SW-75 (in 1536, out 1536, 2048 tokens, 75% sparse), as the wrapper functions launch them; the
    wrappers' own torch ops run under the dispatch `mode` where given."""
    recorded = []
    generator = torch.Generator().manual_seed(0)
    n = 1536 // block
    active = torch.rand(n, n, generator=generator) < 0.25
    crow = torch.cat([torch.zeros(1, dtype=torch.long), active.sum(1).cumsum(0)])
    col = active.nonzero()[:, 1]
    x, gy = torch.empty(2048, 1536, dtype=dtype), torch.empty(2048, 1536, dtype=dtype)
    blocks, bias = torch.empty(col.numel(), block, block, dtype=dtype), torch.empty(1536, dtype=dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(block_sparse_triton, "unavailable", lambda *args: None)  # CPU tensors stand in for CUDA ones
        patch.setattr(block_sparse_triton, "_launch", lambda *launch, **meta: recorded.append((*launch, meta)))
        patch.setattr(block_sparse_triton, "token_splits", lambda *args: 2)
        with mode or nullcontext():
            block_sparse_triton.forward(x, blocks, bias, crow, col)
            block_sparse_triton.grad_input(gy, blocks, crow, col, 1536)
            block_sparse_triton.grad_blocks(gy, x, blocks, crow, col)
    return [(kernel, args, meta) for kernel, _grid, *args, meta in recorded]


def compile_for(arch, kernel, args, meta):
    """triton.compile for the CUDA target `arch` with the JIT's own specialisation of `args` (dtypes, alignment and
    divisibility by 16); returns the compiled kernel and the ptxas log (registers, spills)."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, (param, arg) in enumerate(zip(kernel.params, args)):
        kind, desc = native_specialize_impl(CUDABackend, arg, param.is_const, not param.do_not_specialize, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = desc
        elif desc:
            attrs[(i,)] = CUDABackend.parse_attr(desc)
    options = {k: meta[k] for k in block_sparse_triton.LAUNCH_OPTIONS}
    for name, value in meta.items():
        if name not in options:
            signature[name], constexprs[name] = "constexpr", value
    log = io.StringIO()
    with redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
        )
    return compiled, log.getvalue()


# bf16 at every block size on the H100/H200 target, the largest tiles (and fp32's) on the A100 one
COMPILED = {
    80: [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.float32, 128)],
    90: [(torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128)],
}


@pytest.mark.parametrize("arch", [80, 90], ids=["sm_80", "sm_90"])
def test_kernels_compile_for_gpus_without_spills(arch, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a fresh cache: ptxas runs and logs every kernel
    monkeypatch.setenv("TRITON_DUMP_PTXAS_LOG", "1")
    report = []
    for dtype, block in COMPILED[arch]:
        for kernel, args, meta in launches(dtype, block):
            compiled, log = compile_for(arch, kernel, args, meta)
            [registers] = re.findall(r"Used (\d+) registers", log)
            [(stores, loads)] = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
            report.append(
                f"sm_{arch} {str(dtype)[6:]:8} block {block:3} {kernel.__name__:20} warps {meta['num_warps']} "
                f"stages {meta['num_stages']}: {registers} registers, spills {stores} B stored / {loads} B loaded, "
                f"shared memory {compiled.metadata.shared} B"
            )
    print("\n".join(report))
    spilled = [line for line in report if "spills 0 B stored / 0 B loaded" not in line]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


# ops whose output size or value the host must read from the device: a synchronisation, and no CUDA-graph capture
SYNCHRONISING = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "repeat_interleave", "item"}


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_gpu_path_never_waits_for_the_device():
    """Around the launches the wrappers only reshape, convert and sort indices: no op that reads a device value
    back (.item(), .tolist(), nonzero, bincount, ...), so a step can be captured in a CUDA graph."""
    ops = OpNames()
    assert len(launches(torch.bfloat16, 64, ops)) == 3
    assert "argsort" in ops.names or "sort" in ops.names  # the mode saw the index ops
    assert not ops.names & SYNCHRONISING, ops.names & SYNCHRONISING


# --- the kernel choice ------------------------------------------------------------------------------------------
def test_auto_picks_by_device():
    assert resolve_kernel("auto", "cpu", (64, 64), torch.float32) == "cpu"
    assert resolve_kernel("auto", "cpu", (8, 16), torch.bfloat16) == "cpu"
    assert resolve_kernel("auto", "cuda", (128, 128), torch.bfloat16) == "triton"
    assert resolve_kernel("auto", "cuda", (16, 16), torch.float16) == "triton"
    assert resolve_kernel("auto", "cuda", (256, 256), torch.bfloat16) == "torch-bsr"  # beyond triton's blocks
    assert resolve_kernel("auto", "cuda", (256, 256), torch.bfloat16, tokens=100) == "reference"
    assert resolve_kernel("auto", "cuda", (8, 16), torch.float32) == "reference"
    assert resolve_kernel("auto", "meta", (64, 64), torch.float32) == "reference"
    assert KERNEL_CHOICES == ("auto", "cpu", "triton", "torch-bsr", "reference")


def test_auto_without_triton_takes_torch_bsr(monkeypatch):
    monkeypatch.setattr(block_sparse_triton, "triton", None)
    assert resolve_kernel("auto", "cuda", (64, 64), torch.bfloat16) == "torch-bsr"
    with pytest.raises(ValueError, match=r"kernel='triton' cannot .* triton is not importable"):
        resolve_kernel("triton", "cuda", (64, 64), torch.bfloat16)


@pytest.mark.parametrize(
    ("kernel", "device", "block", "words"),
    [
        ("cuda", "cpu", (64, 64), r"kernel='cuda' is not a block-sparse kernel: expected one of \['auto', 'cpu'"),
        ("cpu", "cuda", (64, 64), r"kernel='cpu' cannot .* it computes on CPU tensors, these are on cuda"),
        ("triton", "cpu", (64, 64), r"kernel='triton' cannot .* only in Triton's interpreter \(TRITON_INTERPRET=1"),
        ("triton", "cuda", (8, 16), r"kernel='triton' cannot .* square blocks of 16, 32, 64, 128; these are 8x16"),
        ("torch-bsr", "cpu", (8, 16), r"kernel='torch-bsr' cannot .* square blocks, these are 8x16"),
        ("torch-bsr", "meta", (64, 64), r"kernel='torch-bsr' cannot .* CPU or CUDA tensors, these are on meta"),
    ],
)
def test_impossible_kernel_choices_are_refused(kernel, device, block, words):
    with pytest.raises(ValueError, match=words):
        resolve_kernel(kernel, device, block, torch.float32)


def test_block_sparse_linear_refuses_a_bad_kernel_before_computing(monkeypatch):
    called = []
    monkeypatch.setitem(block_sparse.KERNELS, "cpu", block_sparse.KERNELS["cpu"]._replace(forward=called.append))
    x, blocks = torch.randn(4, 32), torch.randn(2, 16, 16)
    crow, col = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"kernel='fast'"):
        block_sparse_linear(x, blocks, crow, col, 32, kernel="fast")
    with pytest.raises(ValueError, match=r"kernel='triton' cannot"):
        block_sparse_linear(x, blocks, crow, col, 32, kernel="triton")
    assert called == []
    torch.testing.assert_close(
        block_sparse_linear(x, blocks, crow, col, 32, kernel="reference"),
        block_sparse.block_sparse_linear_reference(x, blocks, crow, col, 32),
    )


# --- optional triton --------------------------------------------------------------------------------------------
NO_TRITON = """
import sys
class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked for this test")
sys.meta_path.insert(0, NoTriton())
import torch
from remote import block_sparse, block_sparse_triton
assert block_sparse_triton.triton is None and "triton" not in sys.modules and "hf_sparse_ift" not in sys.modules
print(block_sparse.resolve_kernel("auto", "cuda", (64, 64), torch.bfloat16))
print(block_sparse_triton.unavailable((64, 64), torch.bfloat16, torch.device("cuda")))
x, blocks = torch.randn(3, 32), torch.randn(2, 16, 16)
print(block_sparse.block_sparse_linear(x, blocks, torch.tensor([0, 1, 2]), torch.tensor([1, 0]), 32).shape)
"""


def test_loads_and_computes_without_triton_as_remote_code(tmp_path):
    """The model's files as a checkpoint carries them (a package of copies, no hf_sparse_ift), without triton;
    and transformers, which refuses remote code importing a missing package outside try/except, finds no import."""
    from transformers.dynamic_module_utils import get_imports

    package = tmp_path / "remote"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for source in Path(block_sparse.__file__).parent.glob("*.py"):  # the model folder, which checkpoints copy from
        if source.name == "__init__.py":
            continue
        (package / source.name).write_text(source.read_text())
        assert "triton" not in get_imports(package / source.name), source.name
    proc = subprocess.run([sys.executable, "-c", NO_TRITON], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        "torch-bsr",
        "triton is not importable (ImportError: triton blocked for this test); `pip install triton` (CUDA builds of "
        "torch bring it)",
        "torch.Size([3, 32])",
    ]
