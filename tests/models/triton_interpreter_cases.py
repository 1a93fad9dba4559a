"""The Triton kernel of `block_sparse_linear` in Triton's interpreter, on CPU tensors: forward and every gradient
against `block_sparse_linear_reference`.

Not collected on its own (not named test_*.py): `test_block_sparse_triton.py` runs this file in a subprocess with
``TRITON_INTERPRET=1``, which must be set before the kernels are defined and must not reach other tests.

Tolerances: fp32 to 1e-5 (relative and absolute). fp16 and bf16 against the fp32 product of the same 16-bit values,
within one unit in the last place of the result (2^-10 for fp16, 2^-7 for bf16, relative to each value, plus that
much of the largest value for results near zero): the kernels accumulate in fp32 and round once. In the interpreter
16-bit tiles are multiplied in fp32 (its bf16 arithmetic is wrong); a GPU multiplies them natively into fp32.
"""

import copy
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (tests/models/test_block_sparse_triton.py does)")

from hf_sparse_ift import BlockSparseLinear
from hf_sparse_ift.models.sparse_wide_gpt import block_sparse_triton
from hf_sparse_ift.models.sparse_wide_gpt.block_sparse import block_sparse_linear, block_sparse_linear_reference

assert block_sparse_triton.INTERPRETED


def block_index(out_features, in_features, block, sparsity, fan_in, seed=0):
    """(crow_indices, col_indices) with round((1 - sparsity) x blocks) active blocks. Fan-in "constant": the same
    number in every block-row; "any": anywhere except block-row 0 and block-column 1, which stay empty."""
    generator = torch.Generator().manual_seed(seed)
    n_rows, n_cols = out_features // block, in_features // block
    active = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    if fan_in == "constant":
        per_row = max(1, round((1 - sparsity) * n_cols))
        active.scatter_(1, torch.rand(n_rows, n_cols, generator=generator).argsort(1)[:, :per_row], True)
    else:
        allowed = torch.ones(n_rows, n_cols, dtype=torch.bool)
        allowed[0], allowed[:, 1] = False, False
        places = allowed.flatten().nonzero()[:, 0]
        n_active = max(1, round((1 - sparsity) * n_rows * n_cols))
        chosen = places[torch.randperm(places.numel(), generator=generator)[:n_active]]
        active.view(-1)[chosen] = True
    crow = torch.cat([torch.zeros(1, dtype=torch.long), active.sum(1).cumsum(0)])
    return crow, active.nonzero()[:, 1]


def run(kernel, x, blocks, bias, crow, col, in_features, grad_output):
    """(output, grad x, grad blocks, grad bias) of `block_sparse_linear` with `kernel`."""
    x, blocks, bias = (t.detach().requires_grad_() for t in (x, blocks, bias))
    if kernel == "reference":
        out = block_sparse_linear_reference(x, blocks, crow, col, in_features, bias)
    else:
        out = block_sparse_linear(x, blocks, crow, col, in_features, bias, kernel=kernel)
    return (out, *torch.autograd.grad(out, (x, blocks, bias), grad_output))


def operands(out_features, in_features, block, lead, crow, col, dtype=torch.float32, seed=1):
    """x, blocks, bias, grad_output; the blocks scaled as nn.Linear initialises them, so outputs are about 1."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    blocks = randn(col.numel(), block, block, scale=in_features**-0.5)
    return randn(*lead, in_features), blocks, randn(out_features), randn(*lead, out_features)


CASES = [
    # (out_features, in_features, block, sparsity, fan-in, leading dims of x: ragged token counts)
    (256, 192, 32, 0.5, "any", (2, 37)),
    (256, 192, 32, 0.75, "constant", (45,)),
    (256, 192, 32, 0.9, "any", (3, 7, 5)),
    (256, 256, 64, 0.5, "constant", (130,)),
    (256, 256, 64, 0.75, "any", (2, 65)),
    (192, 256, 64, 0.9, "any", (129,)),
    (256, 256, 128, 0.5, "any", (2, 33)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-b{c[2]}-s{c[3]}-{c[4]}-{len(c[5]) + 1}d")
def test_fp32_equals_reference(case):
    out_features, in_features, block, sparsity, fan_in, lead = case
    crow, col = block_index(out_features, in_features, block, sparsity, fan_in)
    x, blocks, bias, grad_output = operands(out_features, in_features, block, lead, crow, col)
    got = run("triton", x, blocks, bias, crow, col, in_features, grad_output)
    want = run("reference", x, blocks, bias, crow, col, in_features, grad_output)
    assert got[0].shape == (*lead, out_features)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


ULP = {torch.float16: 2**-10, torch.bfloat16: 2**-7}


def within_one_ulp(got, want):
    ulp = ULP[got.dtype]
    torch.testing.assert_close(got.float(), want, rtol=ulp, atol=ulp * want.abs().max().item())


@pytest.mark.parametrize(
    ("dtype", "case"),
    [
        (torch.float16, (256, 192, 32, 0.5, "any", (77,))),
        (torch.float16, (256, 256, 64, 0.75, "constant", (2, 40))),
        (torch.bfloat16, (256, 256, 64, 0.5, "any", (90,))),
    ],
    ids=["fp16-b32", "fp16-b64", "bf16-b64"],
)
def test_half_precision_within_one_ulp_of_the_fp32_product(dtype, case):
    out_features, in_features, block, sparsity, fan_in, lead = case
    crow, col = block_index(out_features, in_features, block, sparsity, fan_in)
    x, blocks, bias, grad_output = operands(out_features, in_features, block, lead, crow, col, dtype)
    got = run("triton", x, blocks, bias, crow, col, in_features, grad_output)
    exact = run("reference", x.float(), blocks.float(), bias.float(), crow, col, in_features, grad_output.float())
    for g, w in zip(got, exact, strict=True):
        assert g.dtype == dtype
        within_one_ulp(g, w)


def test_bf16_autocast_with_fp32_master_blocks():
    crow, col = block_index(128, 192, 32, 0.5, "any")
    x, blocks, bias, grad_output = operands(128, 192, 32, (3, 21), crow, col)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run("triton", x, blocks, bias, crow, col, 192, grad_output.bfloat16())
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    cast = [t.bfloat16().float() for t in (x, blocks, bias, grad_output)]
    exact = run("reference", *cast[:3], crow, col, 192, cast[3])
    within_one_ulp(got[0], exact[0])
    for g, w in zip(got[1:], exact[1:], strict=True):  # the fp32 gradients of bf16 values rounded once
        within_one_ulp(g.bfloat16(), w)


def test_no_active_blocks_gives_the_bias_and_zero_gradients():
    crow, col = torch.zeros(5, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    x, blocks, bias = torch.randn(70, 96), torch.randn(0, 32, 32), torch.randn(128)
    x.requires_grad_(), blocks.requires_grad_(), bias.requires_grad_()
    out = block_sparse_linear(x, blocks, crow, col, 96, bias, kernel="triton")
    assert torch.equal(out, bias.detach().expand(70, 128))
    grad_x, grad_blocks, grad_bias = torch.autograd.grad(out.sum(), (x, blocks, bias))  # an expanded grad_output
    assert torch.equal(grad_x, torch.zeros(70, 96)) and grad_blocks.shape == (0, 32, 32)
    assert torch.equal(grad_bias, torch.full((128,), 70.0))


def test_int32_indices_and_no_bias():
    crow, col = block_index(128, 128, 32, 0.5, "any")
    x, blocks, _, grad_output = operands(128, 128, 32, (50,), crow, col)
    got = block_sparse_triton.forward(x, blocks, None, crow.int(), col.int())
    torch.testing.assert_close(got, block_sparse_linear_reference(x, blocks, crow, col, 128), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        block_sparse_triton.grad_input(grad_output, blocks, crow.int(), col.int(), 128),
        block_sparse_triton.grad_input(grad_output, blocks, crow, col, 128),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("splits", [2, 3])
def test_block_gradients_split_over_tokens(splits):
    """More token splits than token tiles leaves some splits empty; their zero partial sums change nothing."""
    crow, col = block_index(128, 192, 64, 0.5, "any")
    x, blocks, _, grad_output = operands(128, 192, 64, (200,), crow, col)
    whole = block_sparse_triton.grad_blocks(grad_output, x, blocks, crow, col, splits=1)
    split = block_sparse_triton.grad_blocks(grad_output, x, blocks, crow, col, splits=splits)
    want = run("reference", x, blocks, torch.zeros(128), crow, col, 192, grad_output)[2]
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, want, rtol=1e-5, atol=1e-5)


def test_topology_change_keeps_every_launch_the_same(monkeypatch):
    """A DST update rewrites the index tensors in place; the next step computes with the new blocks, and every
    kernel is launched with the same grid, scalars, shapes, dtypes and constexprs (nothing to recompile)."""
    launches = []
    real_launch = block_sparse_triton._launch

    def recording_launch(kernel, grid, *args, **meta):
        described = [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
        launches.append((kernel, grid, described, meta))
        real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(block_sparse_triton, "_launch", recording_launch)
    crow, col = block_index(256, 192, 32, 0.75, "any", seed=0)
    x, blocks, bias, grad_output = operands(256, 192, 32, (70,), crow, col)
    results = []
    for seed in (0, 1):
        new_crow, new_col = block_index(256, 192, 32, 0.75, "any", seed=seed)
        crow.copy_(new_crow), col.copy_(new_col)  # what BlockSparseLinear.set_block_mask does
        got = run("triton", x, blocks, bias, crow, col, 192, grad_output)
        want = run("reference", x, blocks, bias, crow, col, 192, grad_output)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        results.append(got[0])
    assert not torch.allclose(results[0], results[1])  # the topology did change
    assert len(launches) == 6 and launches[:3] == launches[3:]


def test_layer_with_the_triton_kernel_and_rigls_dense_gradient_observer():
    torch.manual_seed(0)
    layer = BlockSparseLinear(192, 128, sparsity_block=(32, 32), sparsity=0.5, kernel="triton")
    twin = copy.deepcopy(layer)
    twin.kernel = "reference"
    seen = {}
    layer.grad_observer = lambda grad: seen.setdefault("triton", grad)
    twin.grad_observer = lambda grad: seen.setdefault("reference", grad)
    x = torch.randn(2, 35, 192)
    layer(x).square().sum().backward()
    twin(x).square().sum().backward()
    torch.testing.assert_close(seen["triton"], seen["reference"], rtol=1e-5, atol=1e-5)
    assert seen["triton"].shape == (128, 192) and bool(seen["triton"][~layer.weight_mask].ne(0).any())
    torch.testing.assert_close(layer.weight_blocks.grad, twin.weight_blocks.grad, rtol=1e-5, atol=1e-5)
