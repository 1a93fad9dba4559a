"""`block_sparse_linear`: outputs and gradients equal the masked dense layer's, on every path and input shape."""

import os
import shutil
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from hf_sparse_ift.errors import UsageError
from hf_sparse_ift.kernels.build import build_kernel
from hf_sparse_ift.models.sparse_wide_gpt import block_sparse, block_sparse_bsr, block_sparse_cpu, native_kernels
from hf_sparse_ift.models.sparse_wide_gpt.block_sparse import (
    block_sparse_linear,
    block_sparse_linear_reference,
    dense_from_blocks,
)


def random_blocks(out_features, in_features, block, density, fan_in, dtype=torch.float32, seed=0):
    """(blocks, crow_indices, col_indices): constant fan-in (the same number of blocks in every block-row) or any,
    where the first block-row is always empty."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = block
    n_rows, n_cols = out_features // rows, in_features // cols
    if fan_in == "constant":
        k = max(1, round(density * n_cols))
        active = torch.zeros(n_rows, n_cols, dtype=torch.bool)
        active.scatter_(1, torch.rand(n_rows, n_cols, generator=generator).argsort(1)[:, :k], True)
    else:
        active = torch.rand(n_rows, n_cols, generator=generator) < density
        active[0] = False
    crow_indices = torch.cat([torch.zeros(1, dtype=torch.long), active.sum(1).cumsum(0)])
    col_indices = active.nonzero()[:, 1]
    blocks = torch.randn(col_indices.numel(), rows, cols, generator=generator, dtype=dtype)
    return blocks, crow_indices, col_indices


def gradients(fn, x, blocks, bias, grad_output):
    inputs = [t for t in (x, blocks, bias) if t is not None and t.requires_grad]
    out = fn(x, blocks, bias)
    return (out, *torch.autograd.grad(out, inputs, grad_output))


CASES = [
    # (out_features, in_features, (block rows, block cols), density, fan-in, leading dims of x)
    (64, 96, (16, 16), 0.5, "constant", (2, 7)),
    (64, 96, (16, 16), 0.25, "any", (13,)),
    (48, 64, (8, 16), 0.4, "any", (3, 2, 5)),
    (48, 64, (16, 8), 0.6, "constant", (11,)),
    (128, 64, (32, 32), 0.1, "constant", (2, 9)),
    (64, 128, (16, 32), 0.5, "any", (401,)),  # non-square blocks for the native kernel; tiles of 384 tokens and a tail
    (96, 64, (32, 16), 0.5, "constant", (3,)),
    (256, 192, (128, 64), 0.5, "any", (2, 70)),  # native: two 64-column panels per block-row, sub-tiles and a tail
]


@pytest.fixture(scope="session")
def native_library(tmp_path_factory):
    """The native block-sparse kernel, built by the explicit build step (as `hf-sparse-ift build-kernels` does) into
    a kernel cache of its own."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        pytest.skip("no C compiler on this machine: the native kernel cannot be tested here")
    folder = tmp_path_factory.mktemp("kernels")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_SPARSE_IFT_CACHE", str(folder))
        patch.delenv("HF_SPARSE_IFT_KERNEL", raising=False)
        build_kernel(block_sparse_cpu)  # a machine with a compiler must build the kernel
        library = block_sparse_cpu.load_kernel()
        block_sparse_cpu.forget()
    assert library is not None
    return folder, library


PATHS = [
    "torch-1thread",
    "torch-2threads",
    "torch-few-tokens",
    "native-1thread",
    "native-2threads",
    "native-own-2threads",
    "native-dot",
]


@pytest.fixture(params=PATHS)
def threads(request, monkeypatch):
    """The CPU paths. Torch: one GEMM per block on one torch thread (inline) or on two (the worker pool), and the
    batched forward for few tokens. Native (blocks whose sides are multiples of 16; others take the torch path):
    register-tiled products on one or two threads (torch's OpenMP ones, or the library's own), and the read-once dot
    forward. Restores the thread setting."""
    before = torch.get_num_threads()
    path, mode = request.param.split("-", 1)
    library = request.getfixturevalue("native_library")[1] if path == "native" else None
    if mode.startswith("own-"):
        openmp = native_kernels.openmp_parallel_entry()
        library.pool_use_openmp(None)
        request.addfinalizer(lambda: library.pool_use_openmp(None if openmp is None else openmp[1]))
        mode = mode.removeprefix("own-")
    monkeypatch.setattr(block_sparse_cpu, "_library", library)
    monkeypatch.setattr(block_sparse_cpu, "FEW_TOKENS", 10**9 if mode == "few-tokens" else 0)
    monkeypatch.setattr(block_sparse_cpu, "DOT_TOKENS", 10**9 if mode == "dot" else 0)
    torch.set_num_threads(1 if mode == "1thread" else 2)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}-{c[3]}-{c[4]}-{len(c[5]) + 1}d"
)
def test_equals_masked_dense_fp32(case, with_bias, threads):
    out_features, in_features, block, density, fan_in, lead = case
    blocks, crow, col = random_blocks(out_features, in_features, block, density, fan_in)
    blocks.requires_grad_()
    x = torch.randn(*lead, in_features, requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True) if with_bias else None
    grad_output = torch.randn(*lead, out_features)
    fast = gradients(lambda x, b, c: block_sparse_linear(x, b, crow, col, in_features, c), x, blocks, bias, grad_output)
    reference = gradients(
        lambda x, b, c: block_sparse_linear_reference(x, b, crow, col, in_features, c), x, blocks, bias, grad_output
    )
    # the masked dense layer: F.linear with the full weight, its gradient read at the active blocks
    weight = dense_from_blocks(blocks.detach(), crow, col, in_features).requires_grad_()
    masked = gradients(F.linear, x, weight, bias, grad_output)
    rows, cols = block
    rows_of_blocks = block_sparse.block_rows_of(crow)
    masked_block_grad = masked[2].view(out_features // rows, rows, in_features // cols, cols)[rows_of_blocks, :, col]
    masked = (masked[0], masked[1], masked_block_grad, *masked[3:])
    assert fast[0].shape == (*lead, out_features)
    for got, want_reference, want_masked in zip(fast, reference, masked, strict=True):
        # fp32 sums in another order: a few units of fp32 rounding of the largest value (sums of up to 401 terms)
        atol = 1e-5 * max(1.0, want_reference.abs().max().item())
        torch.testing.assert_close(got, want_reference, rtol=1e-5, atol=atol)
        torch.testing.assert_close(got, want_masked, rtol=1e-5, atol=atol)


def test_empty_block_rows_and_columns(threads):
    """Block-rows and block-columns without an active block: outputs are the bias, input gradients zero."""
    blocks = torch.randn(3, 16, 16, requires_grad=True)
    crow = torch.tensor([0, 0, 2, 2, 3])  # block-rows 0 and 2 empty
    col = torch.tensor([1, 3, 1])  # block-columns 0 and 2 empty
    x = torch.randn(7, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    grad_output = torch.randn(7, 64)
    got = gradients(lambda x, b, c: block_sparse_linear(x, b, crow, col, 64, c), x, blocks, bias, grad_output)
    want = gradients(
        lambda x, b, c: block_sparse_linear_reference(x, b, crow, col, 64, c), x, blocks, bias, grad_output
    )
    assert torch.equal(got[0][:, :16], bias.detach()[:16].expand(7, 16))
    assert torch.equal(got[1][:, :16], torch.zeros(7, 16)) and torch.equal(got[1][:, 32:48], torch.zeros(7, 16))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_native_kernel_computes_blocks_of_multiples_of_16(native_library, monkeypatch):
    """With the built kernel, 16 x 32 blocks never reach the torch path; 8 x 16 blocks take it."""
    monkeypatch.setattr(block_sparse_cpu, "_library", native_library[1])
    torch_path = {}
    for name in ("torch_forward", "torch_grad_input", "torch_grad_blocks"):
        real = getattr(block_sparse_cpu, name)
        monkeypatch.setattr(
            block_sparse_cpu, name, lambda *a, _name=name, _real=real: torch_path.setdefault(_name, 0) or _real(*a)
        )
    for block, expected in (((16, 32), {}), ((8, 16), {"torch_forward", "torch_grad_input", "torch_grad_blocks"})):
        torch_path.clear()
        blocks, crow, col = random_blocks(64, 128, block, 0.5, "any")
        blocks.requires_grad_()
        x = torch.randn(9, 128, requires_grad=True)
        block_sparse_linear(x, blocks, crow, col, 128).sum().backward()
        assert set(torch_path) == set(expected)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize(
    "case",
    [
        (192, 256, (64, 64), 0.4, "any", 250),  # steps of 96 tokens and a tail; the first block-row empty
        (256, 384, (32, 64), 0.3, "constant", 97),
        (64, 192, (16, 16), 0.2, "any", 1),
        (64, 192, (16, 16), 0.5, "any", 0),
    ],
    ids=lambda c: f"{c[0]}x{c[1]}-b{c[2][0]}x{c[2][1]}-{c[4]}-{c[5]}tokens" if isinstance(c, tuple) else c,
)
def test_fused_native_backward_gives_the_bits_of_the_two_passes(native_library, monkeypatch, case, n_threads):
    """`bsr_backward` (both gradients in one pass) against `bsr_grad_input` and `bsr_grad_blocks`: the same sums in
    the same order, so equal bits; block-columns without blocks get a zero input gradient."""
    out_features, in_features, block, density, fan_in, tokens = case
    monkeypatch.setattr(block_sparse_cpu, "_library", native_library[1])
    blocks, crow, col = random_blocks(out_features, in_features, block, density, fan_in)
    empty_columns = torch.bincount(col, minlength=in_features // block[1]) == 0
    x, gy = torch.randn(tokens, in_features), torch.randn(tokens, out_features)
    before = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        fused = block_sparse_cpu._native_backward(native_library[1], gy, x, blocks, crow, col, in_features)
        separate = (
            block_sparse_cpu.grad_input(gy, blocks, crow, col, in_features),
            block_sparse_cpu.grad_blocks(gy, x, blocks, crow, col),
        )
    finally:
        torch.set_num_threads(before)
    for got, want in zip(fused, separate, strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(
        fused[0].view(tokens, in_features // block[1], block[1])[:, empty_columns],
        torch.zeros(tokens, int(empty_columns.sum()), block[1]),
    )
    reference = dense_from_blocks(blocks, crow, col, in_features)
    torch.testing.assert_close(fused[0], gy @ reference, rtol=1e-5, atol=1e-4)


def test_autograd_takes_the_fused_backward_where_there_are_columns_enough(native_library, monkeypatch):
    """Both gradients wanted and at least FUSED_BACKWARD_COLUMNS_PER_THREAD block-columns per thread: one fused pass;
    fewer columns, or one gradient only: the separate passes."""
    monkeypatch.setattr(block_sparse_cpu, "_library", native_library[1])
    calls = []
    for name in ("_native_backward", "_native_grad_input", "_native_grad_blocks"):
        real = getattr(block_sparse_cpu, name)
        monkeypatch.setattr(block_sparse_cpu, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for in_features, x_grad, expected in (
            (96, True, ["_native_backward"]),  # 6 columns of 16: 3 per thread
            (80, True, ["_native_grad_input", "_native_grad_blocks"]),  # 5 columns
            (96, False, ["_native_grad_blocks"]),
        ):
            calls.clear()
            blocks, crow, col = random_blocks(64, in_features, (16, 16), 0.5, "constant")
            blocks.requires_grad_()
            x = torch.randn(40, in_features, requires_grad=x_grad)
            block_sparse_linear(x, blocks, crow, col, in_features).sum().backward()
            assert calls == expected, (in_features, x_grad)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_match_reference_on_every_path(threads, dtype):
    blocks, crow, col = random_blocks(64, 96, (16, 16), 0.5, "any", dtype=dtype)
    blocks.requires_grad_()
    x = torch.randn(11, 96, dtype=dtype, requires_grad=True)
    bias = torch.randn(64, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(11, 64, dtype=dtype)
    got = gradients(lambda x, b, c: block_sparse_linear(x, b, crow, col, 96, c), x, blocks, bias, grad_output)
    want = gradients(
        lambda x, b, c: block_sparse_linear_reference(x, b, crow, col, 96, c), x, blocks, bias, grad_output
    )
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        bf16_close(g, w)


def test_a_bad_kernel_threads_setting_is_refused_naming_it(native_library, monkeypatch):
    monkeypatch.setenv("HF_SPARSE_IFT_CACHE", str(native_library[0]))
    monkeypatch.setenv("HF_SPARSE_IFT_KERNEL_THREADS", "hyper")
    monkeypatch.setattr(block_sparse_cpu, "_library", block_sparse_cpu._UNSET)
    with pytest.raises(UsageError, match=r"HF_SPARSE_IFT_KERNEL_THREADS='hyper' is invalid.*'openmp', 'own'"):
        block_sparse_cpu.load_kernel()


def test_the_native_kernel_says_which_threads_it_runs_on(native_library, monkeypatch):
    monkeypatch.setenv("HF_SPARSE_IFT_CACHE", str(native_library[0]))
    for setting, want in (("own", "own"), ("openmp", "openmp ")):
        monkeypatch.setenv("HF_SPARSE_IFT_KERNEL_THREADS", setting)
        monkeypatch.setattr(block_sparse_cpu, "_library", block_sparse_cpu._UNSET)
        block_sparse_cpu.load_kernel()
        threads = block_sparse_cpu.kernel_info()["threads"]
        assert threads == want if setting == "own" else threads.startswith(want), threads


def test_a_damaged_native_library_is_refused(native_library, tmp_path, monkeypatch, caplog):
    """The loader compares the library with its build record before mapping it (a truncated one kills the process
    with SIGBUS); block-sparse layers then compute with torch."""
    cache = tmp_path / "cache"
    shutil.copytree(native_library[0], cache)
    monkeypatch.setenv("HF_SPARSE_IFT_CACHE", str(cache))
    monkeypatch.delenv("HF_SPARSE_IFT_KERNEL", raising=False)
    monkeypatch.setattr(block_sparse_cpu, "_library", block_sparse_cpu._UNSET)
    library = native_kernels.library_path(block_sparse_cpu.STEM, block_sparse_cpu.KERNEL_ABI)
    library.write_bytes(library.read_bytes()[:4096])
    with caplog.at_level("WARNING", logger=block_sparse_cpu.__name__):
        assert block_sparse_cpu.load_kernel() is None
    assert "its build record says" in caplog.text and "hf-sparse-ift build-kernels" in caplog.text
    blocks, crow, col = random_blocks(32, 48, (16, 16), 0.5, "constant")
    x = torch.randn(4, 48)
    torch.testing.assert_close(
        block_sparse_linear(x, blocks, crow, col, 48), block_sparse_linear_reference(x, blocks, crow, col, 48)
    )


def test_empty_block_rows_give_bias_and_zero_gradients(threads):
    blocks, crow, col = random_blocks(64, 32, (16, 16), 0.5, "any")
    crow = torch.tensor([0, 0, 0, 0, 0])  # no active block at all
    blocks, col = blocks[:0].requires_grad_(), col[:0]
    x = torch.randn(5, 32, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    out = block_sparse_linear(x, blocks, crow, col, 32, bias)
    assert torch.equal(out, bias.detach().expand(5, 64))
    grad_x, grad_blocks, grad_bias = torch.autograd.grad(out.sum(), (x, blocks, bias))
    assert torch.equal(grad_x, torch.zeros(5, 32)) and grad_blocks.shape == (0, 16, 16)
    assert torch.equal(grad_bias, torch.full((64,), 5.0))


@pytest.mark.parametrize("wanted", ["x", "blocks", "bias"])
def test_gradients_only_for_inputs_that_require_them(wanted):
    blocks, crow, col = random_blocks(32, 48, (16, 16), 0.5, "constant")
    x, bias = torch.randn(4, 48), torch.randn(32)
    inputs = {"x": x, "blocks": blocks, "bias": bias}
    inputs[wanted].requires_grad_()
    out = block_sparse_linear(inputs["x"], inputs["blocks"], crow, col, 48, inputs["bias"])
    out.sum().backward()
    assert [name for name, t in inputs.items() if t.grad is not None] == [wanted]
    want = block_sparse_linear_reference(inputs["x"], inputs["blocks"], crow, col, 48, inputs["bias"])
    expected = torch.autograd.grad(want.sum(), inputs[wanted])[0]
    torch.testing.assert_close(inputs[wanted].grad, expected, rtol=1e-5, atol=1e-5)


def test_inference_without_grad():
    blocks, crow, col = random_blocks(32, 48, (8, 8), 0.5, "any")
    x = torch.randn(2, 3, 48)
    with torch.inference_mode():
        out = block_sparse_linear(x, blocks, crow, col, 48)
    torch.testing.assert_close(out, block_sparse_linear_reference(x, blocks, crow, col, 48), rtol=1e-5, atol=1e-5)


def test_without_gradients_the_operator_runs_undispatched_with_its_bits(threads, monkeypatch):
    blocks, crow, col = random_blocks(64, 96, (16, 16), 0.5, "any")
    x, bias = torch.randn(2, 5, 96), torch.randn(64)
    dispatched = block_sparse._linear(x, blocks, bias, crow, col, 96, "cpu")
    calls = []
    monkeypatch.setattr(block_sparse, "_linear", lambda *a: calls.append(a) or dispatched)
    with torch.no_grad():
        eager = block_sparse_linear(x, blocks, crow, col, 96, bias, kernel="cpu")
    with torch.inference_mode():
        inference = block_sparse_linear(x, blocks, crow, col, 96, bias, kernel="cpu")
    frozen = block_sparse_linear(x, blocks, crow, col, 96, bias, kernel="cpu")  # grad mode, nothing requires it
    assert not calls and all(torch.equal(out, dispatched) for out in (eager, inference, frozen))
    # anything that requires a gradient goes through the operator and its autograd registration
    block_sparse_linear(x, blocks.requires_grad_(), crow, col, 96, bias, kernel="cpu")
    assert len(calls) == 1


def bf16_close(got, want):
    """Equal within bf16 rounding: a few units of bf16's last place (2^-8 relative) of the largest value."""
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=4 * 2**-8 * scale)


def test_bf16_autocast_with_fp32_master_blocks_matches_f_linear(threads):
    blocks, crow, col = random_blocks(64, 96, (16, 16), 0.5, "any")
    blocks.requires_grad_()
    bias = torch.randn(64, requires_grad=True)
    x = torch.randn(3, 10, 96, requires_grad=True)
    grad_output = torch.randn(3, 10, 64, dtype=torch.bfloat16)
    weight = dense_from_blocks(blocks.detach(), crow, col, 96).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block_sparse_linear(x, blocks, crow, col, 96, bias)
        want = F.linear(x, weight, bias)
    assert out.dtype == want.dtype == torch.bfloat16
    got_grads = torch.autograd.grad(out, (x, blocks, bias), grad_output)
    want_grads = torch.autograd.grad(want, (x, weight, bias), grad_output)
    assert [g.dtype for g in got_grads] == [torch.float32] * 3  # through the autocast casts to the fp32 inputs
    bf16_close(out, want)
    bf16_close(got_grads[0], want_grads[0])
    bf16_close(got_grads[1], want_grads[1].view(4, 16, 6, 16).transpose(1, 2)[block_sparse.block_rows_of(crow), col])
    bf16_close(got_grads[2], want_grads[2])


def test_bf16_inputs_match_reference():
    blocks, crow, col = random_blocks(48, 64, (16, 8), 0.5, "constant", dtype=torch.bfloat16)
    blocks.requires_grad_()
    x = torch.randn(7, 64, dtype=torch.bfloat16, requires_grad=True)
    grad_output = torch.randn(7, 48, dtype=torch.bfloat16)
    got = gradients(lambda x, b, _: block_sparse_linear(x, b, crow, col, 64), x, blocks, None, grad_output)
    want = gradients(lambda x, b, _: block_sparse_linear_reference(x, b, crow, col, 64), x, blocks, None, grad_output)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        bf16_close(g, w)


def test_gradcheck_float64():
    blocks, crow, col = random_blocks(8, 12, (2, 3), 0.5, "any", dtype=torch.float64)
    x = torch.randn(2, 1, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    blocks.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b, c: block_sparse_linear(x, b, crow, col, 12, c), (x, blocks, bias))


def test_worker_pool_changes_no_thread_setting_but_its_own(monkeypatch):
    """Starting the torch path's worker pool never calls torch.set_num_threads (which also rewrites the default of
    every thread started later): the caller, a thread started afterwards and the process default keep their
    setting, and only the workers run single-threaded."""
    if sys.platform == "linux":
        assert block_sparse_cpu._worker_thread_setters() is not None  # torch's OpenMP (and MKL) are found
    before = torch.get_num_threads()
    real_set = torch.set_num_threads
    real_set(2)
    calls = []
    monkeypatch.setattr(
        torch, "set_num_threads", lambda n: (calls.append(threading.current_thread().name), real_set(n))
    )
    monkeypatch.setattr(block_sparse_cpu, "_POOLS", {})
    monkeypatch.setattr(block_sparse_cpu, "_library", None)
    try:
        blocks, crow, col = random_blocks(64, 64, (16, 16), 0.5, "constant")
        x = torch.randn(40, 64)
        torch.testing.assert_close(
            block_sparse_linear(x, blocks, crow, col, 64), block_sparse_linear_reference(x, blocks, crow, col, 64)
        )
        assert calls == [] and torch.get_num_threads() == 2
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == [2]  # the process default, unchanged
        if sys.platform == "linux":  # the pool exists there, and its workers alone are single-threaded
            assert block_sparse_cpu._POOLS[2].submit(torch.get_num_threads).result() == 1
    finally:
        for pool in block_sparse_cpu._POOLS.values():
            pool.shutdown()
        real_set(before)


@pytest.mark.parametrize("fan_in", ["constant", "any"])
def test_bsr_kernel_path_on_cpu_tensors(fan_in):
    """torch's BSR kernels, the CUDA fallback, run on CPU tensors when named; they need square blocks there (MKL)."""
    blocks, crow, col = random_blocks(64, 96, (16, 16), 0.4, fan_in)
    blocks.requires_grad_()
    x = torch.randn(2, 5, 96, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    grad_output = torch.randn(2, 5, 64)
    got = gradients(
        lambda x, b, c: block_sparse_linear(x, b, crow, col, 96, c, kernel="torch-bsr"),
        x,
        blocks,
        bias,
        grad_output,
    )
    want = gradients(
        lambda x, b, c: block_sparse_linear_reference(x, b, crow, col, 96, c), x, blocks, bias, grad_output
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_triton_bsr_kernels_take_only_what_they_support():
    take = block_sparse_bsr.takes
    assert take(torch.Size([64, 64]), torch.bfloat16, 2048)
    assert not take(torch.Size([32, 64]), torch.float32, 2048)  # not square
    assert not take(torch.Size([8, 8]), torch.float32, 2048)  # below 16
    assert not take(torch.Size([48, 48]), torch.float32, 2048)  # not a power of two
    assert not take(torch.Size([64, 64]), torch.float64, 2048)
    assert not take(torch.Size([64, 64]), torch.float32, 2047)  # tokens not a multiple of 16


def test_meta_tensors_take_the_reference_path():
    blocks, crow, col = random_blocks(32, 48, (16, 16), 0.5, "constant")
    out = block_sparse_linear(torch.randn(4, 48, device="meta"), blocks.to("meta"), crow, col, 48)
    assert out.shape == (4, 32) and out.is_meta


def test_mismatched_dtypes_are_refused():
    blocks, crow, col = random_blocks(32, 48, (16, 16), 0.5, "constant")
    with pytest.raises(RuntimeError, match=r"x torch.bfloat16, blocks torch.float32"):
        block_sparse_linear(torch.randn(4, 48, dtype=torch.bfloat16), blocks, crow, col, 48)
