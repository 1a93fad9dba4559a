"""Bad input to `hf-sparse-ift pretrain`: a sentence naming the value and what is valid, a non-zero exit, no
traceback, no work started, and earlier outputs byte-for-byte unchanged. Each case runs twice: into a fresh
folder (which must stay absent) and as --resume of a finished run (whose files must not change)."""

import json

import helpers
import pytest

from hf_sparse_ift.cli import main

FAST = [*helpers.FAST, "data.prefetch_batches=0", "train.max_steps=1"]
# should a case not be refused, it trains one step, not the preset's 600


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert (
        main(
            [
                "pretrain",
                *FAST,
                f"train.output_dir={out}",
                "train.max_steps=2",
                "train.checkpoint_interval=2",
                "train.eval_interval=2",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "empty.jsonl").write_text("")
    (root / "body.jsonl").write_text("".join(json.dumps({"body": f"doc {i} " * 30}) + "\n" for i in range(300)))
    (root / "docs.xyz").write_text("hello\n")
    texts = [f"doc {i} " * 30 for i in range(300)]
    for name, row, value in (("null.jsonl", 5, None), ("number.jsonl", 7, 42)):  # row: 1-based
        (root / name).write_text(
            "".join(json.dumps({"text": value if i == row - 1 else t}) + "\n" for i, t in enumerate(texts))
        )
    (root / "empty-cell.csv").write_text(
        "text,id\n" + "".join(f"{'' if i == 3 else t},{i}\n" for i, t in enumerate(texts))
    )
    (root / "not-a-folder").write_text("a file")
    return root


CASES = {
    # name: (overrides, words the message must contain)
    "missing data file": (["data.data_files={root}/nope.jsonl"], ["nope.jsonl", "matches no file"]),
    "loader without files": (["data.dataset=json"], ["data.dataset='json'", "needs data.data_files"]),
    "empty data file": (["data.data_files={root}/empty.jsonl"], ["empty.jsonl", "no documents"]),
    "no such column": (["data.data_files={root}/body.jsonl"], ["data.text_column='text'", "columns: ['body']"]),
    "unknown file format": (["data.data_files={root}/docs.xyz"], ["docs.xyz", "cannot tell the format", ".jsonl"]),
    "bad split": (["data.train_split=dev"], ["data.train_split='dev'", "['train', 'validation']"]),
    "tokenizer not found": (["data.tokenizer={root}/no-tokenizer"], ["data.tokenizer=", "no-tokenizer"]),
    "model too large": (
        ["model.sparsity=0.99999"],
        ["GB to train", "model.sparsity=0.99999", "train.check_memory=false"],
    ),
    "lr not a number": (["optim.lr=fast"], ["optim.lr='fast'", "expected a number"]),
    "unknown precision": (["train.mixed_precision=fp8"], ["train.mixed_precision='fp8'", "'bf16'"]),
    "unknown DST method": (["dst.method=prune"], ["dst.method='prune'", "'set'", "'srigl'"]),
    "misspelt key": (["train.max_stpes=3"], ["train.max_stpes", "max_steps"]),
    "batch not a multiple": (["train.global_batch_size=10"], ["train.global_batch_size=10", "multiple"]),
    "heads do not divide": (["model.n_head=5"], ["n_head=5", "must divide"]),
    "context too long": (["data.seq_len=4096"], ["data.seq_len=4096", "n_positions"]),
    "override without =": (["train.max_steps"], ["'train.max_steps'", "section.key=value"]),
    "output folder not writable": (["train.output_dir={root}/not-a-folder/run"], ["not-a-folder", "not writable"]),
    "null text": (
        ["data.data_files={root}/null.jsonl"],
        ["null.jsonl, row 5: column 'text' holds None (NoneType), not text", "data.bad_text=skip"],
    ),
    "number as text": (["data.data_files={root}/number.jsonl"], ["number.jsonl, row 7: column 'text' holds 42 (int)"]),
    "empty CSV cell": (["data.data_files={root}/empty-cell.csv"], ["empty-cell.csv, row 4: column 'text' holds None"]),
    "unknown bad-text policy": (["data.bad_text=ignore"], ["data.bad_text='ignore'", "'error'", "'skip'"]),
}


def run_case(capsys, args):
    code = main(["pretrain", *args])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_with_a_sentence_before_any_work(name, files, finished_run, tmp_path, capsys):
    overrides, words = CASES[name]
    overrides = [o.format(root=files) for o in overrides]
    fresh = tmp_path / "fresh"
    out_given = any(o.startswith("train.output_dir=") for o in overrides)
    code, err = run_case(capsys, [*FAST, *([] if out_given else [f"train.output_dir={fresh}"]), *overrides])
    assert code == 2 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert not fresh.exists()

    if out_given:
        return
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    code, err = run_case(
        capsys, ["--resume", *FAST, f"train.output_dir={finished_run}", "train.max_steps=3", *overrides]
    )
    assert code == 2 and "Traceback" not in err and words[0] in err, err
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before


def test_resume_with_a_changed_recipe_is_refused_naming_each_key(finished_run, capsys):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    code, err = run_case(
        capsys,
        [
            "--resume",
            *FAST,
            f"train.output_dir={finished_run}",
            "train.max_steps=3",
            "optim.lr=1e-4",
            "dst.drop_fraction=0.5",
        ],
    )
    assert code == 2 and "optim.lr: 0.003 -> 0.0001" in err and "dst.drop_fraction: 0.3 -> 0.5" in err, err
    assert "train.max_steps" in err  # the keys that may change are listed
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before


def test_floats_written_like_1e_4_are_floats(tmp_path):
    from hf_sparse_ift.training.config import load_pretrain_config

    cfg = load_pretrain_config(
        "pretrain-tiny", ["optim.lr=1e-4", "optim.warmup_tokens=5e5", f"train.output_dir={tmp_path}"]
    )
    assert cfg.optim.lr == 1e-4 and cfg.optim.warmup_tokens == 5e5
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: tiny-sw75}\noptim: {lr: 2e-3, eps: 1E-8}\n")
    assert load_pretrain_config(str(config)).optim.eps == 1e-8


def test_an_existing_run_is_not_overwritten_without_resume(finished_run, capsys):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    code, err = run_case(capsys, [*FAST, f"train.output_dir={finished_run}"])
    assert code == 2 and "already holds checkpoints: pass --resume" in err
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before
