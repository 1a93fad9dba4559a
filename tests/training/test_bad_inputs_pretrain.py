"""Bad input to `hf-sparse-ift pretrain`: a sentence naming the value and what is valid, a non-zero exit, no
traceback, no work started, and earlier outputs byte-for-byte unchanged. Each case runs twice: into a fresh
folder (which must stay absent) and as --resume of a finished run (whose files must not change)."""

import json
import platform
from types import SimpleNamespace

import helpers
import pytest
import torch
import yaml

from hf_sparse_ift.cli import main
from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import model_summary

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
    "unknown allocator": (["train.cpu_allocator=jemalloc"], ["train.cpu_allocator='jemalloc'", "'keep-freed'"]),
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
    # round 3
    "block with no active block": (
        ["model.sparsity_block=64"],
        ["sparsity_block=64 is invalid", "q_proj (64 x 64) keeps no active weight", "e.g. 16"],
    ),
    "block that cannot be iso-FLOP": (
        ["model.sparsity_block=24"],  # widths 72 / 264: 3 x 11 blocks, 3% more FLOPs at the nearest sparsity
        ["sparsity_block=24 is invalid", "1.031x the dense model's FLOPs", "iso-FLOP needs 1 +- 0.01"],
    ),
    "total_tokens beside max_steps": (
        ["train.total_tokens=100000"],
        ["train.total_tokens=100000 is invalid", "is set too", "train.max_steps=null"],
    ),
    "malformed YAML value": (["optim.betas=[0.9"], ["'optim.betas=[0.9'", "not valid YAML", "close brackets"]),
    "SRigL on a block model": (
        ["model.sparsity_block=16", "dst.method=srigl"],
        ["dst.method='srigl' is invalid", "block-sparse", "['rigl', 'set', 'static']"],
    ),
    "DST on a dense model": (["model.sparsity=0", "dst.method=set"], ["dst.method='set' is invalid", "static"]),
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


def test_a_bad_kernel_threads_setting_is_refused_before_any_work(finished_run, tmp_path, capsys, monkeypatch):
    """HF_SPARSE_IFT_KERNEL_THREADS is read when the run decides what its CPU block kernel runs, built or not."""
    from hf_sparse_ift.models.sparse_wide_gpt import block_sparse_cpu

    monkeypatch.setenv("HF_SPARSE_IFT_KERNEL_THREADS", "hyper")
    monkeypatch.setattr(block_sparse_cpu, "_library", block_sparse_cpu._UNSET)  # decided afresh
    fresh = tmp_path / "fresh"
    block = ["model.preset=tiny-sw75-block16", f"train.output_dir={fresh}"]
    code, err = run_case(capsys, [*FAST, *block])
    assert code == 2 and "Traceback" not in err, err
    assert "HF_SPARSE_IFT_KERNEL_THREADS='hyper' is invalid" in err and "'openmp', 'own'" in err, err
    assert not fresh.exists()


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


# ---------------------------------------------------------------------------------------------- round 3
@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is real on a GPU")
def test_fp16_without_a_gpu_is_refused_naming_what_runs_on_cpu(tmp_path, capsys):
    # accelerate applies no autocast for fp16 on CPU: the run would be fp32 recorded as fp16
    code, err = run_case(capsys, [*FAST, f"train.output_dir={tmp_path / 'run'}", "train.mixed_precision=fp16"])
    assert code == 2 and "train.mixed_precision='fp16' is invalid" in err and "'bf16'" in err and "'no'" in err, err
    assert not (tmp_path / "run").exists()


def test_print_config_runs_the_checks_pretrain_runs(capsys):
    code, err = run_case(capsys, ["--print-config", *FAST, "model.sparsity_block=16", "dst.method=srigl"])
    assert code == 2 and "dst.method='srigl' is invalid" in err, err


def test_a_config_file_that_is_not_yaml_is_one_sentence(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {preset: tiny-sw75\ntrain: {max_steps: 2}\n")
    for command in ("pretrain", "study"):
        code = main([command, "--config", str(broken)])
        err = capsys.readouterr().err
        assert code == 2 and f"{broken} is not valid YAML at line 2" in err and "Traceback" not in err, err


def test_total_tokens_alone_sets_the_length(tmp_path):
    from hf_sparse_ift.training.config import load_pretrain_config

    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {preset: tiny-sw75}\ndata: {seq_len: 128}\ntrain: {global_batch_size: 16, total_tokens: 1e5}\n"
    )
    assert load_pretrain_config(str(config)).steps() == 49  # ceil(1e5 / (16 x 128)), not the default max_steps
    overridden = load_pretrain_config("pretrain-tiny", ["train.total_tokens=100000", "train.max_steps=null"])
    assert overridden.steps() == 49


def test_a_dst_schedule_without_an_update_is_recorded(capsys):
    code = main(["pretrain", "--print-config", *FAST, "train.max_steps=4", "dst.method=set", "dst.update_interval=3"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert any("dst.method=set makes no mask update in this run" in d for d in printed["resolved"]["decisions"])
    main(["pretrain", "--print-config", *FAST, "train.max_steps=40", "dst.method=set", "dst.update_interval=3"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert not any("no mask update" in d for d in printed["resolved"]["decisions"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the backend choice is real on a GPU")
def test_an_attention_backend_without_a_gpu_is_recorded(capsys):
    assert main(["pretrain", "--print-config", *FAST, "train.attention_backend=flash"]) == 0
    decisions = yaml.safe_load(capsys.readouterr().out)["resolved"]["decisions"]
    assert any("train.attention_backend=flash selects among CUDA kernels and has no effect" in d for d in decisions)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto leaves the allocator of a GPU run unchanged")
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep-freed tunes glibc's malloc")
def test_the_cpu_allocator_auto_decides_and_records_it(capsys, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(name, raising=False)

    def printed(*overrides):
        assert main(["pretrain", "--print-config", *FAST, *overrides]) == 0
        return yaml.safe_load(capsys.readouterr().out)["resolved"]

    resolved = printed()
    assert resolved["cpu_allocator"] == "keep-freed"
    assert any(d.startswith("train.cpu_allocator=auto: keep-freed (glibc mallopt") for d in resolved["decisions"])
    resolved = printed("train.cpu_allocator=unchanged")  # what the user chose is no decision
    assert resolved["cpu_allocator"] == "unchanged"
    assert not any("cpu_allocator" in d for d in resolved["decisions"])
    # a process started with its allocator tuned or replaced keeps it, and the records say why
    for name, value in (("MALLOC_MMAP_THRESHOLD_", "65536"), ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")):
        monkeypatch.setenv(name, value)
        resolved = printed()
        assert resolved["cpu_allocator"] == "unchanged"
        assert f"train.cpu_allocator=auto: unchanged, because the environment sets the allocator ({name}" in (
            " ".join(resolved["decisions"])
        )
        monkeypatch.delenv(name)


def test_keep_freed_without_glibc_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    code, err = run_case(capsys, [*FAST, f"train.output_dir={tmp_path / 'run'}", "train.cpu_allocator=keep-freed"])
    assert code == 2 and "train.cpu_allocator='keep-freed' is invalid here" in err and "musl" in err, err
    assert "'unchanged'" in err and not (tmp_path / "run").exists()


def test_memory_check_of_a_block_model_counts_its_active_blocks_only():
    from hf_sparse_ift.resources import model_config
    from hf_sparse_ift.training.run import training_memory_bytes

    # GPT-3 Small SW-99 in 64 x 64 blocks: ~488M active parameters, 16 bytes each (weights, gradients, Adam)
    config = model_config("gpt3-small-dense", sparsity=0.99, sparsity_block=64)
    active = model_summary(config, 2048)["parameters_active"]
    assert 480e6 < active < 495e6
    assert training_memory_bytes(config, 2048) == 16 * active


def test_tokens_per_s_is_tokens_over_training_time_of_the_window():
    from hf_sparse_ift.training.loop import StepLog

    now = [100.0]
    logged = []
    session = SimpleNamespace(
        accelerator=SimpleNamespace(is_main_process=True, log=lambda logs, step: logged.append((step, logs))),
        run=SimpleNamespace(
            config=SimpleNamespace(train=SimpleNamespace(progress_bar=False, log_interval=1)),
            total_steps=4,
            tokens_per_step=1000,
        ),
        progress=SimpleNamespace(step=0, train_loss=[]),
        engine=SimpleNamespace(sparsity=lambda: 0.75),
        peak=1e12,
        model_summary={"training_flops_per_token": 6e6, "training_flops_per_token_executed": 2.4e7},
    )
    log = StepLog(session, clock=lambda: now[0])
    log.start()
    for step in (1, 2):  # 2 s per step; the loop records each step one step late
        now[0] += 2.0
        log.step_done(step)
    log.record(1, 3.0, None, 1e-3)
    with log.not_training():  # an evaluation: 10 s that are no training time
        now[0] += 10.0
    log.record(2, 3.0, None, 1e-3)  # recorded at once after step 1 (flushed before an evaluation)
    now[0] += 4.0
    log.step_done(3)
    log.record(3, 3.0, None, 1e-3)
    rates = [logs["train/tokens_per_s"] for _, logs in logged]
    assert rates == [500.0, 500.0, 250.0]  # 1000 tokens / 2 s, again, then 1000 / 4 s
    assert session.last_tokens_per_s == 250.0
    assert logged[0][1]["train/mfu_active"] == 500.0 * 6e6 / 1e12


def test_resume_after_the_preset_file_changed_names_the_model_change(tmp_path, capsys):
    preset = tmp_path / "m.yaml"
    fields = "vocab_size: 4096\nn_layer: 1\nn_head: 2\ndense_hidden_size: 16\nsparsity: 0.75\nbos_token_id: 0\n"
    preset.write_text(fields)
    out = tmp_path / "run"
    args = [a for a in FAST if not a.startswith(("model.n_layer", "model.dense_hidden_size"))]  # from the file
    args += [f"model.preset={preset}", f"train.output_dir={out}"]
    assert main(["pretrain", *args]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for edited, change in (
        (fields + "resid_pdrop: 0.3\n", "model.resid_pdrop: 0.0 -> 0.3"),
        (fields.replace("hidden_size: 16", "hidden_size: 32"), "model.dense_hidden_size: 16 -> 32"),  # a shape
    ):
        preset.write_text(edited)
        code, err = run_case(capsys, ["--resume", *args, "train.max_steps=2"])
        assert code == 2 and change in err and f"model.preset='{preset}' was edited" in err, err
        assert "no complete checkpoint" not in err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_the_model_card_records_what_ran_and_what_was_decided(finished_run):
    card = (finished_run / "checkpoint-2" / "hf" / "README.md").read_text()
    assert "| precision | no |" in card  # what ran (train.mixed_precision=auto resolved on CPU), not "auto"
    assert "decided for this run" in card and "train.mixed_precision=auto: no" in card
    if not torch.cuda.is_available() and platform.libc_ver()[0] == "glibc":
        assert "train.cpu_allocator=auto: keep-freed (glibc mallopt M_TRIM_THRESHOLD=2147483647" in card
    assert "dst.method=set makes no mask update in this run" in card  # 2 steps, dst.update_interval=3


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--mfu", "0"], "--mfu 0 is invalid: expected a fraction of the peak, 0 < mfu <= 1"),  # ZeroDivisionError
        (["--mfu", "2"], "--mfu 2 is invalid"),  # 200% MFU was printed
        (["--peak-tflops", "0"], "--peak-tflops 0 is invalid"),  # ZeroDivisionError
        (["--paper-scale"], "--paper-scale applies to a study's arms: pass it with --study"),  # was ignored
        (["--study", "study-cpu-small", "train.max_steps=3"], "overrides ['train.max_steps=3'] apply to one"),
    ],
)
def test_plan_refuses_figures_it_cannot_compute_and_flags_it_would_ignore(argv, expected, capsys):
    code = main(["plan", *argv])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err, err
