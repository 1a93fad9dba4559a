"""Condensed layers and models: outputs equal the masked model's, generate / pipeline, save / load, CLI, benchmark."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_benchmark_rerun_refused, tiny_config
from transformers import AutoModelForCausalLM, pipeline

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.cli import main as cli_main
from hf_sparse_ift.kernels.build import build_kernel
from hf_sparse_ift.models.sparse_wide_gpt import condensed_kernel, native_kernels
from hf_sparse_ift.sparsity.checkpoint_layouts import (
    CondensedLinear,
    condensed_layers,
    condensed_summary,
    kernel_available,
)
from hf_sparse_ift.sparsity.masks import SparseLinear, sparse_layers

ROOT = Path(__file__).resolve().parents[2]


def use_kernel_cache(monkeypatch, folder) -> None:
    """Look for (and build) the kernel in `folder`, deciding afresh which path condensed layers take."""
    monkeypatch.setenv("HF_SPARSE_IFT_CACHE", str(folder))
    monkeypatch.delenv("HF_SPARSE_IFT_KERNEL", raising=False)
    monkeypatch.setattr(condensed_kernel, "_library", condensed_kernel._UNSET)


@pytest.fixture(scope="session")
def built_kernel_cache(tmp_path_factory):
    """A kernel cache holding a library built by the explicit build step (as `hf-sparse-ift build-kernels` does)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        pytest.skip("no C compiler on this machine: the kernel path cannot be tested here")
    folder = tmp_path_factory.mktemp("kernels")
    with pytest.MonkeyPatch.context() as patch:
        use_kernel_cache(patch, folder)
        build_kernel(condensed_kernel)  # a machine with a compiler must build the kernel
    return folder


@pytest.fixture(params=["kernel", "torch"])
def compute_path(request, monkeypatch):
    """Run a test with the built kernel and with the torch path (CSR matmul; embedding_bag under autograd)."""
    if request.param == "kernel":
        use_kernel_cache(monkeypatch, request.getfixturevalue("built_kernel_cache"))
        assert kernel_available()
    else:
        monkeypatch.setattr(condensed_kernel, "_library", None)
    return request.param


def masked_linear(d_in, d_out, fan_in=None, density=0.3, ablate=(), seed=0, dtype=torch.float32):
    """A SparseLinear with a given mask: constant fan-in (SRigL) if fan_in, else uniform (SET); rows in `ablate`
    have no active weight. Some active weights are exactly zero (regrown)."""
    g = torch.Generator().manual_seed(seed)
    lin = SparseLinear(d_in, d_out)
    if fan_in:
        cols = torch.rand(d_out, d_in, generator=g).argsort(1)[:, :fan_in]
        mask = torch.zeros(d_out, d_in, dtype=torch.bool).scatter_(1, cols, True)
    else:
        mask = torch.rand(d_out, d_in, generator=g) < density
    mask[list(ablate)] = False
    with torch.no_grad():
        lin.weight_mask.copy_(mask)
        lin.weight.masked_fill_(~mask, 0.0)
        lin.weight.view(-1)[mask.view(-1).nonzero().squeeze(1)[::11]] = 0.0
    return lin.to(dtype)


def test_srigl_layer_is_rows_by_k_and_ablated_rows_are_dropped(compute_path):
    lin = masked_linear(40, 24, fan_in=7, ablate=(3, 17, 18))
    c = CondensedLinear.from_sparse(lin)
    assert c.fan_in == 7 and c.values.shape == (21, 7) and c.col_indices.shape == (21, 7)
    assert c.col_indices.dtype == torch.int16 and not hasattr(c, "row_ptr")
    assert c.row_ids.tolist() == [r for r in range(24) if r not in (3, 17, 18)]
    weight, mask = c.to_dense()
    assert torch.equal(mask, lin.weight_mask) and torch.equal(weight, lin.weight)
    for tokens in (1, 5, 70):  # batch-1 decode, small tile, 64-token tiles
        x = torch.randn(2, tokens, 40)
        with torch.no_grad():
            torch.testing.assert_close(c(x), lin(x), rtol=0, atol=1e-5)
            assert torch.equal(c(x)[..., 3], lin.bias[3].expand(2, tokens))  # ablated neuron: its bias, exactly


@pytest.mark.parametrize("representation", ["auto", "csr", "padded"])
def test_variable_fan_in_layer(representation, compute_path):
    lin = masked_linear(50, 33, density=0.2, ablate=(0, 9))
    c = CondensedLinear.from_sparse(lin, representation)
    if representation == "padded":
        assert c.fan_in == int(lin.weight_mask.sum(1).max()) and c.values.shape[0] == 31
    else:
        assert c.fan_in is None and c.values.numel() == int(lin.weight_mask.sum()) and c.row_ptr.numel() == 32
    weight, mask = c.to_dense()
    assert torch.equal(mask, lin.weight_mask) and torch.equal(weight, lin.weight)
    for tokens in (1, 20):
        x = torch.randn(tokens, 50)
        with torch.no_grad():
            torch.testing.assert_close(c(x), lin(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("representation", ["auto", "csr", "padded"])
def test_one_token_kernel_path_reads_each_rows_inputs_from_a_bit_mask(representation, built_kernel_cache, monkeypatch):
    """Batch 1, fp32: the kernel's bit-mask path (AVX-512 expanding loads; elsewhere the same sums one input at a
    time) gives the masked layer's outputs from masks built from col_indices (padding slots excluded), which are the
    layer's mask; the layer takes that path where the library has the AVX-512 form."""
    use_kernel_cache(monkeypatch, built_kernel_cache)
    lin = masked_linear(130, 40, fan_in=None if representation == "csr" else 23, density=0.3, ablate=(5,))
    if representation == "padded":  # rows of different fan-ins, padded
        lin = masked_linear(130, 40, density=0.3, ablate=(5,))
    c = CondensedLinear.from_sparse(lin, representation)
    words = c._row_input_masks()
    assert words.shape == (c.row_ids.numel(), 3)
    bits = (words.unsqueeze(-1) >> torch.arange(64)) & 1  # (rows, words, 64), bit c % 64 of word c // 64
    assert torch.equal(bits.reshape(words.shape[0], -1)[:, :130].bool(), lin.weight_mask[c.row_ids])
    x = torch.randn(1, 130)
    lib = condensed_kernel.load_kernel()
    y = lin.bias.detach().expand(1, -1).clone()
    lib.gemv_mask_f32(x.data_ptr(), c.values.data_ptr(), words.data_ptr(), c._row_ptr().data_ptr(),
                      c.row_ids.data_ptr(), c.bias.data_ptr(), y.data_ptr(), c.row_ids.numel(), 3, 2)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(y, lin(x), rtol=0, atol=1e-5)
        c._input_masks = None
        torch.testing.assert_close(c(x), lin(x), rtol=0, atol=1e-5)
    assert (c._input_masks is not None) == bool(lib.gemv_mask_native())  # the path the layer took
    if c._input_masks is not None:
        assert c._input_masks[1] is c._row_input_masks()  # built once, kept


def test_bf16_layer_within_rounding(compute_path):
    lin = masked_linear(64, 48, fan_in=16, dtype=torch.bfloat16)
    c = CondensedLinear.from_sparse(lin)
    assert c.values.dtype == torch.bfloat16
    ref = masked_linear(64, 48, fan_in=16)  # the same weights in fp32 (bf16 -> fp32 is exact)
    with torch.no_grad():
        ref.weight.copy_(lin.weight.float())
        ref.bias.copy_(lin.bias.float())
        for tokens in (1, 20):
            x = torch.randn(tokens, 64).bfloat16()
            exact = ref(x.float())
            # condensed accumulates in fp32 and rounds once: within half a bf16 ulp of the exact value
            assert ((c(x).float() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()
            masked = lin(x).float()
            assert ((c(x).float() - masked).abs() <= exact.abs() * 2**-6 + 1e-2).all()


def test_gradients_flow_through_the_torch_path():
    lin = masked_linear(20, 10, fan_in=5)
    c = CondensedLinear.from_sparse(lin)
    c.values.requires_grad_(True)
    x = torch.randn(3, 20, requires_grad=True)
    c(x).sum().backward()
    lin(x).sum().backward()
    assert c.values.grad is not None and x.grad is not None
    torch.testing.assert_close(c.values.grad, lin.weight.grad.gather(1, c.col_indices.long()), rtol=0, atol=1e-6)


def test_condensed_model_logits_generate_pipeline_save_load(tmp_path, builtin_tokenizer, compute_path):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=builtin_tokenizer.vocab_size)
    model = SparseWideGPTForCausalLM(config).eval()
    condensed = SparseWideGPTForCausalLM(config).eval()
    condensed.load_state_dict(model.state_dict())
    assert condensed.condense() is condensed
    assert not sparse_layers(condensed) and len(condensed_layers(condensed)) == 12
    assert condensed.config.sparse_format["format"] == "condensed-v1"
    assert condensed.config.sparse_format["layers"]["h.1.mlp.fc_out"] == condensed.transformer.h[1].mlp.fc_out.spec()
    x = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(condensed(x).logits, model(x).logits, rtol=0, atol=1e-5)
        want = model.generate(x[:1], max_new_tokens=8, do_sample=False)
        assert torch.equal(condensed.generate(x[:1], max_new_tokens=8, do_sample=False), want)
    text = pipeline("text-generation", model=condensed, tokenizer=builtin_tokenizer)(
        "def f(x):", max_new_tokens=5, do_sample=False
    )
    assert text[0]["generated_text"].startswith("def f(x):")
    condensed.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sparse_format"]["format"] == "condensed-v1"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.transformer.h[1].mlp.fc_out, CondensedLinear)
    assert loaded.state_dict().keys() == condensed.state_dict().keys()
    for key, t in condensed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="invalid for a condensed model"):
        condensed.save_pretrained(tmp_path / "x", sparse_format="plain")


def test_condensed_bf16_model_within_rounding():
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config()).eval().to(torch.bfloat16)
    condensed = SparseWideGPTForCausalLM(tiny_config()).eval().to(torch.bfloat16)
    condensed.load_state_dict(model.state_dict())
    condensed.condense()
    x = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        a, b = condensed(x).logits.float(), model(x).logits.float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()  # a few bf16 roundings along 2 layers


def test_condense_srigl_masks_in_a_model():
    """A model whose masks have constant fan-in (as SRigL leaves them) condenses to [rows, k] layers."""
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(tiny_config()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in sparse_layers(model).values():
            out, inp = m.weight.shape
            cols = torch.rand(out, inp, generator=g).argsort(1)[:, : inp // 4]
            m.weight_mask.zero_().scatter_(1, cols, True)
            m.weight_mask[: out // 8] = False  # ablated neurons
            m.weight.masked_fill_(~m.weight_mask, 0)
    x = torch.randint(0, 97, (1, 13))
    with torch.no_grad():
        want = model(x).logits
        model.condense()
        got = model(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    summary = condensed_summary(model)
    assert summary["layers"] == summary["constant_fan_in_layers"] == 12
    assert summary["rows"] == summary["out_features"] - sum(o // 8 for o in (32, 32, 32, 32, 128, 32) * 2)


def test_cli_condense(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "masked")
    assert cli_main(["condense", str(tmp_path / "masked"), str(tmp_path / "fast"), "--representation", "csr"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_format"] == "bitmask-values-v1" and report["output_format"] == "condensed-v1"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fast").eval()
    assert all(m.fan_in is None for m in condensed_layers(loaded).values())
    x = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, tiny_model(x).logits, rtol=0, atol=1e-5)
    assert cli_main(["condense", str(tmp_path / "fast"), str(tmp_path / "again")]) == 2
    assert "is condensed" in capsys.readouterr().err
    assert cli_main(["condense", str(tmp_path / "masked"), str(tmp_path / "fast")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_invalid_representation_is_named(tiny_model):
    with pytest.raises(
        ValueError, match=r"representation='ell' is invalid: expected one of \['auto', 'csr', 'padded'\]"
    ):
        tiny_model.condense("ell")


def test_condensed_inference_benchmark_smoke(tmp_path, built_kernel_cache):
    env = {**os.environ, "HF_SPARSE_IFT_CACHE": str(built_kernel_cache)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "condensed_inference.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*-condensed.json")).read_text())
    assert report["kernel"] and report["kernel_source"]["path"].startswith(str(built_kernel_cache))
    variants = {(r["dtype"], r["variant"]) for r in report["results"]}
    for dtype in ("float32", "bfloat16"):
        for v in (
            "dense",
            "sw75-masked",
            "sw75-condensed",
            "sw90-masked",
            "sw90-condensed",
            "sw75-set-csr",
            "sw75-set-padded",
        ):
            assert (dtype, v) in variants
    assert all(r["decode_ms_per_token_median"] > 0 and r["prefill_s_median"] > 0 for r in report["results"])
    assert all(
        r["same_greedy_tokens_as_masked"] == 1.0
        for r in report["results"]
        if r["dtype"] == "float32" and r["same_greedy_tokens_as_masked"] is not None
    )
    assert (
        f"GPU: not used: this script measures CPU inference (CUDA available: {torch.cuda.is_available()})"
        in next(tmp_path.glob("*-condensed.md")).read_text()
    )
    assert_benchmark_rerun_refused(proc.args, tmp_path, env)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "condensed_inference.py"),
            "--smoke",
            "--torch-path",
            "--out",
            str(tmp_path / "torch-path"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_benchmark_rerun_refused(proc.args, tmp_path / "torch-path", env)
    rows = json.loads(next((tmp_path / "torch-path").glob("*-condensed-torch-path.json")).read_text())["results"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert all(r[f"{k}_ms_per_token"] > 0 for r in rows for k in ("masked", "condensed-kernel", "condensed-torch-path"))


def test_compressed_checkpoints_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compressed_checkpoints.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_benchmark_rerun_refused(proc.args, tmp_path)
    report = json.loads(next(tmp_path.glob("*-compressed.json")).read_text())
    assert [r["preset"] for r in report["results"]] == ["gpt3-small-sw50", "gpt3-small-sw75", "gpt3-small-sw90"]
    for r in report["results"]:
        assert r["bit_exact"] and r["sparse_ratio"] > 2 and r["checkpoint_ratio"] > 1


def test_without_a_built_kernel_the_torch_path_runs_with_one_message(tmp_path, monkeypatch, caplog):
    lin = masked_linear(40, 24, fan_in=7)
    layer = CondensedLinear.from_sparse(lin)
    x = torch.randn(3, 40)
    use_kernel_cache(monkeypatch, tmp_path / "empty-cache")
    with torch.no_grad(), caplog.at_level("INFO", logger=condensed_kernel.__name__):
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-6)
        layer(x)
    messages = [r.getMessage() for r in caplog.records if r.name == condensed_kernel.__name__]
    assert len(messages) == 1 and messages[0].startswith("Condensed layers compute with torch: no built native kernel")
    assert "hf-sparse-ift build-kernels" in messages[0] and caplog.records[-1].levelname == "WARNING"
    use_kernel_cache(monkeypatch, tmp_path / "empty-cache")
    monkeypatch.setenv("HF_SPARSE_IFT_KERNEL", "0")  # chosen: said at info level, no warning
    caplog.clear()
    with caplog.at_level("INFO", logger=condensed_kernel.__name__):
        assert not kernel_available()
    assert [r.levelname for r in caplog.records] == ["INFO"]


def test_kernel_and_torch_paths_give_the_same_outputs(built_kernel_cache, monkeypatch):
    layers = [
        CondensedLinear.from_sparse(masked_linear(40, 24, fan_in=7, ablate=(2,))),
        CondensedLinear.from_sparse(masked_linear(50, 33, density=0.2), "csr"),
        CondensedLinear.from_sparse(masked_linear(64, 48, fan_in=16, dtype=torch.bfloat16)),
    ]
    outputs = {}
    for path in ("kernel", "torch"):
        if path == "kernel":
            use_kernel_cache(monkeypatch, built_kernel_cache)
            assert kernel_available()
        else:
            monkeypatch.setattr(condensed_kernel, "_library", None)
        with torch.no_grad():
            outputs[path] = [
                layer(
                    torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens)).to(
                        layer.values.dtype
                    )
                )
                for layer in layers
                for tokens in (1, 5, 70)
            ]
    for kernel, reference in zip(outputs["kernel"], outputs["torch"]):
        tolerance = 1e-5 if kernel.dtype == torch.float32 else 1e-2  # bf16: the two round the same sum differently
        torch.testing.assert_close(kernel, reference, rtol=tolerance, atol=tolerance)


def test_build_kernels_command_records_where_the_kernel_came_from(built_kernel_cache, monkeypatch, tmp_path, capsys):
    use_kernel_cache(monkeypatch, built_kernel_cache)
    info = condensed_kernel.kernel_info()
    assert info["path"] == str(condensed_kernel.library_path()) and info["abi"] == condensed_kernel.KERNEL_ABI
    assert info["source_sha256"] == native_kernels.source_sha256(condensed_kernel.SOURCE)
    assert info["library_bytes"] == condensed_kernel.library_path().stat().st_size
    use_kernel_cache(monkeypatch, tmp_path / "cache")
    monkeypatch.setenv("CC", "/bin/false")  # a "compiler" that always fails
    assert cli_main(["build-kernels"]) == 2
    assert "hf-sparse-ift build-kernels: error: could not compile the condensed kernel" in capsys.readouterr().err
    assert not condensed_kernel.library_path().exists() and not kernel_available()


@pytest.mark.parametrize("damage", ["truncated", "changed", "no-record"])
def test_a_damaged_library_is_refused_before_it_is_loaded(built_kernel_cache, monkeypatch, tmp_path, caplog, damage):
    """A truncated library, mapped by the dynamic loader, kills the process with SIGBUS at its first call: the
    loader compares the file with the size and sha256 of its build record first, and the torch path runs."""
    cache = tmp_path / "cache"
    shutil.copytree(built_kernel_cache, cache)  # a new path: this process has not mapped that file
    use_kernel_cache(monkeypatch, cache)
    library = condensed_kernel.library_path()
    data = library.read_bytes()
    if damage == "truncated":
        library.write_bytes(data[: len(data) // 2])
    elif damage == "changed":
        library.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        library.with_suffix(".json").unlink()
    lin = masked_linear(40, 24, fan_in=7)
    layer = CondensedLinear.from_sparse(lin)
    x = torch.randn(3, 40)
    with torch.no_grad(), caplog.at_level("WARNING", logger=condensed_kernel.__name__):
        assert not kernel_available()
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-6)
    reason = {
        "truncated": "bytes, its build record says",
        "changed": "does not match the sha256",
        "no-record": "no build record",
    }[damage]
    assert reason in caplog.text and "hf-sparse-ift build-kernels" in caplog.text


def test_a_condensed_model_refuses_training(tiny_model):
    tiny_model.condense()
    with pytest.raises(ValueError, match="A condensed model is for inference: its values are frozen"):
        tiny_model.train()
    assert not tiny_model.transformer.h[0].attn.q_proj.training


def test_tensor_parallel_loading_of_a_condensed_checkpoint_is_refused(tiny_model, tmp_path):
    tiny_model.condense().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"is condensed \(condensed-v1\), for CPU inference: tensor parallelism"):
        AutoModelForCausalLM.from_pretrained(tmp_path, tp_plan="auto")


def test_a_condensed_checkpoint_without_layer_sizes_is_refused_with_advice(tiny_model, tmp_path):
    tiny_model.condense().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sparse_format"] = {"format": "condensed-v1"}  # as written before the sizes were recorded
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lists no condensed layer sizes .* `hf-sparse-ift condense`"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
