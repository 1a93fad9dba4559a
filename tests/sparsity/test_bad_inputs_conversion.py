"""Bad input to `compress`, `decompress` and `condense`: one sentence naming the bad value and what would be valid,
a non-zero exit, no traceback, no model loaded, and every file that was there before left byte for byte as it was
(no half-written output, no temporary folder left behind)."""

import pytest
import transformers
from helpers import run_refused, tiny_config

from hf_sparse_ift import SparseWideGPTForCausalLM
from hf_sparse_ift.cli import main
from hf_sparse_ift.models.sparse_wide_gpt import SparseWideGPTForCausalLM as ModelClass


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversion")
    model = SparseWideGPTForCausalLM(tiny_config())
    model.save_pretrained(root / "plain", sparse_format="plain")
    model.save_pretrained(root / "compressed")
    SparseWideGPTForCausalLM(tiny_config(sparsity=0.0)).save_pretrained(root / "dense")
    condensed = SparseWideGPTForCausalLM(tiny_config())
    condensed.condense()
    condensed.save_pretrained(root / "condensed")
    (root / "earlier-output").mkdir()
    (root / "earlier-output" / "keep.txt").write_text("an earlier conversion")
    (root / "not-a-checkpoint").mkdir()
    (root / "read-only").mkdir()
    return {"root": root}


CASES = [
    (
        "missing input",
        ["compress", "{root}/nowhere", "{root}/out"],
        ["{root}/nowhere is not a save_pretrained folder: it has no config.json"],
    ),
    (
        "folder without config.json",
        ["condense", "{root}/not-a-checkpoint", "{root}/out"],
        ["{root}/not-a-checkpoint is not a save_pretrained folder"],
    ),
    (
        "decompress a plain checkpoint",
        ["decompress", "{root}/plain", "{root}/out"],
        ["{root}/plain is not compressed (plain layout): nothing to decompress"],
    ),
    (
        "compress a compressed checkpoint",
        ["compress", "{root}/compressed", "{root}/out"],
        ["{root}/compressed is already compressed (bitmask-values-v1)"],
    ),
    (
        "convert a condensed checkpoint",
        ["decompress", "{root}/condensed", "{root}/out"],
        ["{root}/condensed is condensed (condensed-v1); condensed checkpoints cannot be converted"],
    ),
    ("a dense model", ["condense", "{root}/dense", "{root}/out"], ["{root}/dense has no sparse layers (sparsity 0.0)"]),
    (
        "output is the input",
        ["condense", "{root}/compressed", "{root}/compressed"],
        ["output {root}/compressed is the input folder"],
    ),
    (
        "existing output without --overwrite",
        ["compress", "{root}/plain", "{root}/earlier-output"],
        ["{root}/earlier-output already exists; pass --overwrite to replace it"],
    ),
    (
        "read-only output folder",
        ["compress", "{root}/plain", "{root}/read-only/out"],
        ["output '{root}/read-only/out' is not writable", "choose a folder this process can create and write"],
    ),
    (  # the error came from huggingface_hub after loading, naming no flag
        "shard size without a unit",
        ["decompress", "{root}/compressed", "{root}/out", "--max-shard-size", "0"],
        ["--max-shard-size '0' is invalid", "5GB"],
    ),
    (  # --overwrite would delete the input with the folder holding it
        "output holds the input",
        ["decompress", "{root}/compressed", "{root}", "--overwrite"],
        ["output {root} holds the input folder {root}/compressed", "would delete the input"],
    ),
    (
        "output inside the input",
        ["compress", "{root}/plain", "{root}/plain/out"],
        ["output {root}/plain/out is inside the input folder {root}/plain", "would copy itself"],
    ),
]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_and_changes_nothing(ctx, argv, expected, monkeypatch, capsys):
    loaders = [(ModelClass, "from_pretrained"), (transformers.AutoModelForCausalLM, "from_pretrained")]
    assert run_refused(ctx, argv, expected, loaders, monkeypatch, capsys) == 2
    assert not list(ctx["root"].glob(".*tmp-*"))


def test_an_unknown_representation_is_refused_before_any_work(ctx, capsys):
    root = ctx["root"]
    assert main(["condense", str(root / "compressed"), str(root / "out"), "--representation", "ell"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "hf-sparse-ift condense: error: representation='ell' is invalid: expected one of ['auto', 'csr', 'padded']\n"
    )
    assert not (root / "out").exists()
