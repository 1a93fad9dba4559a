"""Block-sparse Sparse Wide GPT: config, block masks, the `BlockSparseLinear` layer, equality with the masked model,
conversion both ways, checkpoints, generation and the commands that refuse block models."""

import hashlib
import json

import pytest
import torch
from helpers import assert_benchmark_rerun_refused, tiny_config

from hf_sparse_ift import BlockSparseLinear, SparseLinear, SparseWideGPTConfig, SparseWideGPTForCausalLM
from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import count_flops, layer_inactive_weights, num_inactive_blocks
from hf_sparse_ift.sparsity import parameter_counts, sparse_layers
from hf_sparse_ift.sparsity.blocks import masked_layer_from_block, to_block_model, to_masked_model


def block_config(**overrides) -> SparseWideGPTConfig:
    """Widths 64/256 (dense 32 at sparsity 0.75): 8x8 blocks give 8x8 and 32x8 block grids."""
    values = dict(dense_hidden_size=32, sparsity_block=8)
    values.update(overrides)
    return tiny_config(**values)


def block_model(**overrides) -> SparseWideGPTForCausalLM:
    torch.manual_seed(0)
    return SparseWideGPTForCausalLM(block_config(**overrides)).eval()


IDS = (torch.arange(24).view(2, 12) * 7) % 97


# --- config -------------------------------------------------------------------------------------------------
def test_block_config_widths_and_whole_block_budget():
    config = block_config()
    assert config.width_multiple == 8  # defaults to the block size
    assert (config.hidden_size, config.intermediate_size) == (64, 256)
    model = SparseWideGPTForCausalLM(config)
    layers = sparse_layers(model)
    assert len(layers) == 12 and all(isinstance(m, BlockSparseLinear) for m in layers.values())
    for layer in layers.values():
        assert layer.weight_mask.sum() == layer.n_active * 64  # whole blocks
    # The sparse layers keep the dense FLOPs within one block per layer.
    wide, dense = count_flops(config.shape()), count_flops(config.dense_shape())
    assert abs(wide.sparse_matmul - dense.sparse_matmul) <= 2 * 64 * 12
    active = sum(int(m.weight_mask.sum()) for m in layers.values())
    assert wide.sparse_matmul == 2 * active


def test_block_budget_arithmetic():
    assert num_inactive_blocks(4, 10, 0.75) == 30  # round(0.75 * 40) blocks anywhere
    assert num_inactive_blocks(4, 10, 0.75, constant_fan_in=True) == 32  # round(7.5) = 8 in each of 4 block-rows
    assert layer_inactive_weights(64, 160, 0.75, (16, 16)) == 30 * 256
    assert layer_inactive_weights(64, 160, 0.75, (16, 16), "constant") == 32 * 256
    assert layer_inactive_weights(64, 160, 0.75) == round(0.75 * 64 * 160)  # unstructured: as before


@pytest.mark.parametrize("fan_in", ["any", "constant"])
def test_gpt3_small_sw75_block64_keeps_the_dense_sparse_layer_flops_and_executes_only_them(fan_in):
    config = SparseWideGPTConfig(sparsity=0.75, sparsity_block=64, block_fan_in=fan_in)
    assert (config.hidden_size, config.intermediate_size) == (1536, 6144)
    flops = count_flops(config.shape())
    assert flops.sparse_matmul == count_flops(config.dense_shape()).sparse_matmul
    assert flops.sparse_matmul_executed == flops.sparse_matmul  # only active blocks are computed
    masked = count_flops(SparseWideGPTConfig(sparsity=0.75).shape())
    assert masked.sparse_matmul_executed == 4 * masked.sparse_matmul  # masked layers multiply their zeros


def test_rectangular_blocks_and_constant_fan_in():
    config = block_config(sparsity_block=[4, 8], block_fan_in="constant")
    assert config.block_shape == (4, 8) and config.width_multiple == 8
    for layer in sparse_layers(SparseWideGPTForCausalLM(config)).values():
        counts = layer.block_mask.sum(dim=1)
        assert layer.sparsity_block == (4, 8)
        assert (counts == counts[0]).all() and int(counts.sum()) == layer.n_active


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (dict(sparsity_block=8, width_multiple=12), ["width_multiple=12", "8"]),
        (dict(sparsity_block=0), ["sparsity_block=0"]),
        (dict(sparsity_block=[8, 8, 8]), ["sparsity_block=[8, 8, 8]"]),
        (dict(sparsity_block=8, block_fan_in="fixed"), ["block_fan_in='fixed'", "constant"]),
        (dict(sparsity_block=1, block_fan_in="constant"), ["block_fan_in='constant'", "srigl"]),
        (dict(sparsity_block=8, block_kernel="cuda"), ["block_kernel='cuda'", "'auto', 'cpu', 'triton'"]),
    ],
)
def test_bad_block_config_is_refused(overrides, words):
    with pytest.raises(ValueError) as err:
        block_config(**overrides)
    for word in words:
        assert word in str(err.value)


def test_bad_layer_arguments_are_refused():
    with pytest.raises(ValueError, match=r"in_features=60 a multiple of 16"):
        BlockSparseLinear(60, 32, sparsity_block=(16, 16), sparsity=0.5)
    with pytest.raises(ValueError, match=r"block_fan_in='fixed' is invalid"):
        BlockSparseLinear(64, 32, sparsity_block=(16, 16), sparsity=0.5, block_fan_in="fixed")


def test_sparsity_block_1_is_todays_model():
    """Same masks and logits as the code before block masks existed (numbers recorded from it, seed 0)."""
    config = tiny_config(sparsity_block=1)
    assert config.to_dict()["sparsity_block"] == 1 and not config.uses_blocks
    torch.manual_seed(0)
    model = SparseWideGPTForCausalLM(config).eval()
    digest = hashlib.sha256()
    for name, buffer in model.named_buffers():
        if name.endswith("weight_mask"):
            digest.update(buffer.numpy().tobytes())
    assert digest.hexdigest() == "81c93ecaf890b9c4d58f076b92ec2cbe350432703df4922f4cffd210a3777a9f"
    with torch.no_grad():
        logits = model(IDS[:1]).logits
    expected = [
        [0.5812574028968811, 0.03769129887223244, -0.08666679263114929, 0.08738353103399277],
        [0.13769954442977905, 0.06527039408683777, 0.2776157855987549, -0.08465660363435745],
        [0.11286327242851257, 0.018740125000476837, 0.018150631338357925, -0.07055263221263885],
    ]
    torch.testing.assert_close(logits[0, ::4, :4], torch.tensor(expected), rtol=0, atol=1e-6)
    assert float(logits.double().sum()) == pytest.approx(9.033540572228958, abs=1e-4)


# --- the layer ----------------------------------------------------------------------------------------------
def masked_twin(layer: BlockSparseLinear) -> SparseLinear:
    return masked_layer_from_block(layer)


@pytest.mark.parametrize("fan_in", ["any", "constant"])
def test_layer_equals_masked_layer_fp32(fan_in):
    torch.manual_seed(0)
    layer = BlockSparseLinear(64, 48, sparsity_block=(8, 16), sparsity=0.75, block_fan_in=fan_in, mask_seed=3)
    twin = masked_twin(layer)
    assert torch.equal(twin.weight_mask, layer.weight_mask)
    x = torch.randn(3, 5, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), twin(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-5)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.dense_weight(layer.weight_blocks.grad), twin.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, twin.bias.grad, rtol=0, atol=1e-5)
    assert layer.weight_blocks.grad.shape == (layer.n_active, 8, 16)  # gradients for active blocks only


def test_layer_equals_masked_layer_bf16():
    torch.manual_seed(0)
    layer = BlockSparseLinear(64, 48, sparsity_block=(16, 16), sparsity=0.5, dtype=torch.bfloat16)
    twin = masked_twin(layer)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), twin(x2)
    # bf16 keeps 8 bits of mantissa: sums of 64 products agree to a few units in the last place.
    torch.testing.assert_close(y1, y2, rtol=1.6e-2, atol=1e-2)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(layer.dense_weight(layer.weight_blocks.grad), twin.weight.grad, rtol=1.6e-2, atol=1e-2)


def test_block_index_and_views():
    layer = BlockSparseLinear(32, 16, sparsity_block=(8, 8), sparsity=0.5, mask_seed=5)
    mask = layer.block_mask
    assert mask.shape == (2, 4) and int(mask.sum()) == 4 == layer.n_active
    assert layer.block_crow_indices.tolist() == [0, int(mask[0].sum()), 4]
    assert layer.block_col_indices.tolist() == mask.nonzero()[:, 1].tolist()
    dense = layer.dense_weight()
    assert torch.equal(dense.ne(0), layer.weight_mask)
    with pytest.raises(AttributeError):
        layer.weight_mask = torch.ones(16, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match="3 active blocks"):
        layer.set_block_mask(torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool))


def test_dense_grad_observer_sees_every_position():
    torch.manual_seed(0)
    layer = BlockSparseLinear(32, 16, sparsity_block=(8, 8), sparsity=0.75)
    twin = masked_twin(layer)
    seen = {}
    layer.grad_observer = lambda grad: seen.setdefault("block", grad)
    twin.grad_observer = lambda grad: seen.setdefault("masked", grad)
    x = torch.randn(6, 32)
    layer(x).square().sum().backward()
    twin(x).square().sum().backward()
    torch.testing.assert_close(seen["block"], seen["masked"], rtol=0, atol=1e-5)
    assert bool(seen["block"][~layer.weight_mask].ne(0).any())


# --- the model ----------------------------------------------------------------------------------------------
def test_the_config_block_kernel_reaches_every_layer():
    auto, reference = block_model(), block_model(block_kernel="reference")
    assert reference.config.block_kernel == "reference" and auto.config.block_kernel == "auto"
    assert {m.kernel for m in sparse_layers(reference).values()} == {"reference"}
    assert "kernel=reference" in repr(sparse_layers(reference)["transformer.h.0.attn.q_proj"])
    torch.testing.assert_close(reference(IDS).logits, auto(IDS).logits, rtol=1e-5, atol=1e-5)


def test_block_model_equals_its_masked_conversion():
    model = block_model()
    masked = to_masked_model(model)
    assert not masked.config.uses_blocks and masked.config.hidden_size == model.config.hidden_size
    for name, layer in sparse_layers(model).items():
        twin = masked.get_submodule(name)
        assert isinstance(twin, SparseLinear)
        assert torch.equal(twin.weight_mask, layer.weight_mask)
        assert torch.equal(twin.weight, layer.dense_weight())
    out, twin_out = model(IDS, labels=IDS), masked(IDS, labels=IDS)
    torch.testing.assert_close(out.logits, twin_out.logits, rtol=0, atol=1e-5)
    out.loss.backward()
    twin_out.loss.backward()
    for name, layer in sparse_layers(model).items():
        twin = masked.get_submodule(name)
        torch.testing.assert_close(layer.dense_weight(layer.weight_blocks.grad), twin.weight.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.transformer.wte.weight.grad, masked.transformer.wte.weight.grad, rtol=0, atol=1e-5)
    # ... and back: the same block model, bit for bit.
    again = to_block_model(masked, sparsity_block=8)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_block_model_bf16_autocast_matches_masked():
    model = block_model()
    masked = to_masked_model(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(IDS).logits, masked(IDS).logits
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_to_block_model_refuses_masks_that_are_not_whole_blocks():
    torch.manual_seed(0)
    masked = SparseWideGPTForCausalLM(block_config(sparsity_block=1))
    with pytest.raises(ValueError, match="partly active"):
        to_block_model(masked, sparsity_block=8)
    with pytest.raises(ValueError, match="already masked"):
        to_masked_model(masked)
    # a block of 128 derives widths 128/256 with one block per attention linear: refused as not iso-FLOP first
    with pytest.raises(ValueError, match=r"sparsity_block=128 is invalid: .* the widths d_model=128, d_ff=256"):
        to_block_model(masked, sparsity_block=128)


def test_parameters_gradients_and_adam_state_exist_for_active_blocks_only():
    model = block_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(IDS, labels=IDS).loss.backward()
    optimizer.step()
    for layer in sparse_layers(model).values():
        state = optimizer.state[layer.weight_blocks]
        shape = (layer.n_active, 8, 8)
        assert layer.weight_blocks.grad.shape == state["exp_avg"].shape == state["exp_avg_sq"].shape == shape
    counts = parameter_counts(model)
    stored = sum(p.numel() for p in model.parameters())
    assert stored == counts["active"]
    masked_counts = parameter_counts(to_masked_model(model))
    assert masked_counts == counts
    names = {name for name, _ in model.named_parameters()}
    assert "transformer.h.0.mlp.fc_in.weight_blocks" in names
    assert not any(name.endswith("fc_in.weight") for name in names)


def test_save_and_load_block_model(tmp_path):
    model = block_model()
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["sparsity_block"] == 8 and config["sparse_format"] is None
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("transformer.h.1.attn.q_proj.weight_blocks").shape[1:] == (8, 8)
    layer = "transformer.h.1.attn.q_proj"
    assert {f"{layer}.weight_blocks", f"{layer}.block_crow_indices", f"{layer}.block_col_indices"} <= keys
    assert not any(k.endswith(("weight_mask", "q_proj.weight")) for k in keys)
    loaded = SparseWideGPTForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_checkpoint_without_block_index_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = block_model()
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith("block_col_indices")}
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="block index"):
        SparseWideGPTForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_damaged_block_index_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = block_model()
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    key = "transformer.h.0.mlp.fc_in.block_col_indices"
    tensors[key][1] = tensors[key][0]  # a block listed twice
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not a valid BSR index of \d+ active blocks on a 32x8 grid"):
        SparseWideGPTForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_generate_and_pipeline(builtin_tokenizer):
    from transformers import pipeline

    model = block_model(vocab_size=len(builtin_tokenizer))
    masked = to_masked_model(model)
    prompt = torch.tensor([builtin_tokenizer("def main():")["input_ids"]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 6)
    assert torch.equal(out, masked.generate(prompt, max_new_tokens=6, do_sample=False))
    generator = pipeline("text-generation", model=model, tokenizer=builtin_tokenizer)
    text = generator("def main():", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text == builtin_tokenizer.decode(out[0])


# --- analysis and the commands that apply to masked models --------------------------------------------------
def test_spectral_analysis_of_a_block_model_is_that_of_its_masked_twin():
    from hf_sparse_ift.sparsity.spectral import model_spectral_stats

    model = block_model()
    block_stats = model_spectral_stats(model)
    masked_stats = model_spectral_stats(to_masked_model(model))
    assert block_stats.keys() == masked_stats.keys() and len(block_stats) == 12
    for name, stats in block_stats.items():
        assert stats == pytest.approx(masked_stats[name], rel=1e-9, abs=1e-9), name


def test_condense_and_compress_refuse_block_models(tmp_path):
    from hf_sparse_ift.sparsity.checkpoint_layouts import convert_checkpoint

    model = block_model()
    with pytest.raises(ValueError, match=r"block-sparse \(sparsity_block=8\).*to_masked_model"):
        model.condense()
    model.save_pretrained(tmp_path / "ckpt")
    for layout in ("bitmask-values-v1", "condensed-v1"):
        with pytest.raises(ValueError, match=rf"block-sparse \(sparsity_block=8\).*{layout} applies to masked"):
            convert_checkpoint(tmp_path / "ckpt", tmp_path / layout, layout)
        assert not (tmp_path / layout).exists()


def test_block_memory_benchmark_smoke(tmp_path):
    """benchmarks/block_memory.py: block layers hold about the memory of their active weights, masked ones ~4x."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "block_memory.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_benchmark_rerun_refused(proc.args, tmp_path)
    [result] = tmp_path.glob("*.json")
    ratios = {r["variant"]: r["sparse_layer_ratio_to_active"] for r in json.loads(result.read_text())["results"]}
    assert ratios.keys() == {"block-8", "block-8-constant", "masked"}
    assert ratios["block-8"] <= 1.1 and ratios["block-8-constant"] <= 1.1
    assert ratios["masked"] > 4.0


def test_a_block_checkpoint_whose_block_count_differs_from_its_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_sparse_ift.errors import UsageError

    block_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    q = "transformer.h.0.attn.q_proj"  # one active block fewer than the config derives
    tensors[f"{q}.block_crow_indices"][-1] -= 1
    tensors[f"{q}.block_col_indices"] = tensors[f"{q}.block_col_indices"][:-1].clone()
    tensors[f"{q}.weight_blocks"] = tensors[f"{q}.weight_blocks"][:-1].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match="do not belong together") as err:
        SparseWideGPTForCausalLM.from_pretrained(tmp_path)
    assert "refused for the tensors of sparse layers" in str(err.value)
    # with the flag, transformers re-initialised weight_blocks at random and kept the file's block index
    with pytest.raises(
        UsageError, match=rf"{q}.(weight_blocks|block_col_indices) .* does not fit the sparse layer .{q}."
    ):
        SparseWideGPTForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


@pytest.mark.parametrize("layout", ["bitmask-values-v1", "plain", None])
def test_save_pretrained_of_a_block_model_refuses_a_masked_layout(tmp_path, layout):
    with pytest.raises(ValueError, match=f"sparse_format={layout!r} is invalid for a block-sparse model"):
        block_model().save_pretrained(tmp_path / "out", sparse_format=layout)
    assert not (tmp_path / "out").exists()
