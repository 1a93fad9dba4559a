"""`hf-sparse-ift export` / `import-gpt2`: a Sparse Wide checkpoint of every layout becomes a plain transformers
GPT-2 folder with the same logits, and back; bad inputs are refused in one line before anything is loaded."""

import json

import pytest
import torch
from helpers import run_refused, snapshot, tiny_config
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.cli import main
from hf_sparse_ift.models.sparse_wide_gpt.convert_gpt2 import sparse_wide_to_gpt2
from hf_sparse_ift.resources import builtin_dir
from hf_sparse_ift.sparsity.masks import sparse_layers

TOKENS = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))


def _trained_like(model):
    """Random values in every active weight and bias (a fresh model's biases are zero), masks unchanged."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        for layer in sparse_layers(model).values():
            if hasattr(layer, "weight_mask") and hasattr(layer, "weight"):
                layer.weight.mul_(layer.weight_mask)
    return model.eval()


def _source(layout):
    torch.manual_seed(0)
    if layout == "block":
        config = tiny_config(dense_hidden_size=32, sparsity_block=8)
    elif layout == "dense":
        config = tiny_config(sparsity=0.0)
    else:
        config = tiny_config()
    model = _trained_like(SparseWideGPTForCausalLM(config))
    if layout == "condensed":
        model.condense()
    return model


def _export(tmp_path, model, sparse_format=None, tokenizer=False):
    src, out = tmp_path / "sw", tmp_path / "gpt2"
    model.save_pretrained(src, **({"sparse_format": sparse_format} if sparse_format else {}))
    if tokenizer:
        AutoTokenizer.from_pretrained(builtin_dir() / "tokenizer").save_pretrained(src)
    assert main(["export", str(src), str(out)]) == 0
    return src, out


@pytest.mark.parametrize(
    ("layout", "sparse_format", "expected"),
    [
        ("masked", "plain", "plain"),
        ("masked", None, "bitmask-values-v1"),  # what save_pretrained writes by default
        ("condensed", None, "condensed-v1"),
        ("block", None, "block 8x8"),
        ("dense", None, "dense"),
    ],
)
def test_export_of_every_layout_is_a_gpt2_with_the_same_logits(tmp_path, capsys, layout, sparse_format, expected):
    model = _source(layout)
    with torch.no_grad():
        reference = model(TOKENS).logits
    src, out = _export(tmp_path, model, sparse_format)
    summary = json.loads(capsys.readouterr().out)
    assert summary["input_layout"] == expected
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_embd"] == model.config.hidden_size
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.py"))  # no remote code needed
    gpt2 = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(gpt2(TOKENS).logits, reference, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert str(src.resolve()) in card and expected in card and summary["input_tensors_sha256"] in card


def test_block_model_converts_in_memory(tmp_path):
    model = _source("block")
    with torch.no_grad():
        torch.testing.assert_close(sparse_wide_to_gpt2(model)(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=0)


def test_export_tokenizer_says_the_models_context_length(tmp_path, capsys):
    vocab = len(AutoTokenizer.from_pretrained(builtin_dir() / "tokenizer"))
    model = _trained_like(SparseWideGPTForCausalLM(tiny_config(vocab_size=vocab)))  # 32 positions; the built-in
    _, out = _export(tmp_path, model, tokenizer=True)  # tokenizer's own config says 2048
    assert json.loads(capsys.readouterr().out)["tokenizer"] is True
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == model.config.n_positions == 32
    ids = tokenizer("word " * 500, truncation=True, return_tensors="pt").input_ids
    assert ids.shape[1] == 32
    GPT2LMHeadModel.from_pretrained(out)(ids)  # fits the positions: no IndexError


def test_head_size_not_a_multiple_of_8_exports_unpadded(tmp_path):
    # As SW-50 at paper width (1092 / 12 = 91): the export keeps the head size, and transformers' GPT-2 runs it.
    model = _trained_like(SparseWideGPTForCausalLM(tiny_config(dense_hidden_size=24, sparsity=0.5)))
    head = model.config.hidden_size // model.config.n_head
    assert head % 8 != 0
    _, out = _export(tmp_path, model)
    gpt2 = GPT2LMHeadModel.from_pretrained(out, attn_implementation="sdpa").eval()
    assert gpt2.config.n_embd == model.config.hidden_size
    with torch.no_grad():
        torch.testing.assert_close(gpt2(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=0)


def test_import_gpt2_gives_a_dense_sparse_wide_model_with_the_same_logits(tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    src, out = tmp_path / "gpt2", tmp_path / "sw"
    gpt2.save_pretrained(src)
    AutoTokenizer.from_pretrained(builtin_dir() / "tokenizer").save_pretrained(src)
    assert main(["import-gpt2", str(src), str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["sparsity"] == 0.0
    assert json.loads((out / "config.json").read_text())["model_type"] == "sparse_wide_gpt"
    model = SparseWideGPTForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, gpt2(TOKENS).logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out).model_max_length == 32


@pytest.fixture
def folders(tmp_path):
    """A Sparse Wide checkpoint, a GPT-2 folder, a folder without config.json and an existing output."""
    root = tmp_path / "root"
    SparseWideGPTForCausalLM(tiny_config()).save_pretrained(root / "sw")
    GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        root / "gpt2"
    )
    (root / "empty").mkdir()
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("mine")
    (root / "read-only").mkdir()
    return {"root": root}


LOADERS = [
    (SparseWideGPTForCausalLM, "from_pretrained"),
    (GPT2LMHeadModel, "from_pretrained"),
]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["export", "{root}/gpt2", "{root}/out"], ["is not a Sparse Wide model", "'gpt2'", "'sparse_wide_gpt'"]),
        (["export", "{root}/empty", "{root}/out"], ["{root}/empty", "has no config.json"]),
        (["export", "{root}/nope", "{root}/out"], ["{root}/nope is not a folder"]),
        (["export", "{root}/sw", "{root}/existing"], ["{root}/existing already exists", "--overwrite"]),
        (["export", "{root}/sw", "{root}/sw"], ["is the input folder"]),
        (["export", "{root}/sw", "{root}/sw/gpt2", "--overwrite"], ["is inside the input folder {root}/sw"]),
        (["export", "{root}/sw", "{root}", "--overwrite"], ["contains the input folder", "delete the input"]),
        (["export", "{root}/sw", "{root}/read-only/x/out"], ["is not writable"]),
        (["import-gpt2", "{root}/sw", "{root}/out"], ["is not a GPT-2 model", "'sparse_wide_gpt'", "'gpt2'"]),
        (["import-gpt2", "{root}/gpt2", "{root}/existing"], ["{root}/existing already exists"]),
        (["import-gpt2", "{root}/gpt2", "{root}/gpt2/sw", "--overwrite"], ["inside the input folder"]),
    ],
)
def test_bad_inputs_are_refused_in_one_line_before_loading(folders, argv, expected, monkeypatch, capsys):
    assert run_refused(folders, argv, expected, LOADERS, monkeypatch, capsys) == 2


def test_overwrite_replaces_an_existing_output(tmp_path, capsys):
    src, out = _export(tmp_path, _source("masked"))
    before = snapshot(src)
    (out / "stale.txt").write_text("old")
    assert main(["export", str(src), str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert snapshot(src) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
