"""`hf-sparse-ift study`: config errors, FLOP columns against `plan`, data hygiene, the spectral gap, and an
end-to-end smoke study (files, equal tokens, equal data order, skip / resume)."""

import copy
import hashlib
import json
import math

import pytest
import torch

from hf_sparse_ift.cli import main
from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import count_flops
from hf_sparse_ift.sparsity.spectral import mask_graph_stats, top_singular_values
from hf_sparse_ift.study import runner
from hf_sparse_ift.study.arms import arm_accounting, build_arms
from hf_sparse_ift.study.config import ArmKind, build_study_config, load_study_config
from hf_sparse_ift.study.results import ArmResult, ComparisonKind, RunResult, compare, verdict

TINY_BASE = {
    "model": {
        "vocab_size": 4096,
        "n_positions": 32,
        "n_layer": 1,
        "n_head": 2,
        "dense_hidden_size": 16,
        "dense_intermediate_size": 64,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "data": {"dataset": "builtin", "tokenizer": "builtin", "seq_len": 32, "prefetch_batches": 0},
    "optim": {"lr": 3e-3, "warmup_tokens": 128},
    "dst": {"update_interval": 2, "drop_fraction": 0.3, "stop_fraction": 0.75},
    "train": {
        "global_batch_size": 4,
        "micro_batch_size": 4,
        "max_steps": 4,
        "eval_interval": 2,
        "eval_batches": 1,
        "checkpoint_interval": 2,
        "keep_checkpoints": 1,
        "log_interval": 2,
        "trackers": ["tensorboard"],
        "progress_bar": False,
    },
}


def tiny_study(out, **study):
    settings = {
        "output_dir": str(out),
        "arms": ["dense", "sparse-wide", "dense-iso-time"],
        "sparsities": [0.75],
        "methods": ["set"],
        "seeds": [0],
        "calibration": {"rounds": 1, "steps": 1, "warmup_steps": 0},
    }
    settings.update(study)
    return {"study": settings, "base": copy.deepcopy(TINY_BASE)}


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "change, key",
    [
        ({"arms": ["dense", "sparse-wider"]}, "study.arms[]='sparse-wider' is invalid: expected one of ['dense'"),
        ({"methods": ["set", "magic"]}, "study.methods[]='magic' is invalid: expected one of"),
        ({"sparsities": [1.0]}, "study.sparsities[]=1.0 is invalid"),
        ({"seeds": []}, "study.seeds=[] is invalid"),
        ({"colour": "red"}, "unknown study key(s) ['study.colour']"),
        ({"calibration": {"round": 2}}, "unknown study key(s) ['study.calibration.round']"),
        ({"iso_time_method": "sgd"}, "study.iso_time_method='sgd' is invalid"),
    ],
)
def test_bad_study_yaml_names_the_key_and_the_valid_values(tmp_path, change, key):
    tree = tiny_study(tmp_path)
    tree["study"].update(change)
    with pytest.raises(ValueError) as err:
        build_study_config(tree)
    assert key in str(err.value)


def test_base_must_be_dense_and_base_keys_are_checked(tmp_path):
    tree = tiny_study(tmp_path)
    tree["base"]["model"]["sparsity"] = 0.5
    with pytest.raises(ValueError, match=r"base.model.sparsity=0.5 is invalid: the base must be the dense model"):
        build_study_config(tree)
    tree = tiny_study(tmp_path)
    tree["base"]["train"]["max_step"] = 3
    with pytest.raises(ValueError, match=r"base: unknown config key\(s\) \['train.max_step'\]"):
        build_study_config(tree)


def test_arm_names_come_from_one_place():
    from hf_sparse_ift.study.arms import arm_name

    assert arm_name(ArmKind.DENSE) == "dense"
    assert arm_name(ArmKind.SPARSE_WIDE, 0.75, "set") == "sw-s75-set"
    assert arm_name(ArmKind.SPARSE_WIDE, 0.75, "set", block=16) == "sw-s75-block16-set"  # the block arms' names
    assert arm_name(ArmKind.DENSE_ISO_FLOP_TOKENS, 0.5) == "dense-iso-flop-tokens-s50"
    study = build_study_config(tiny_study("unused", arms=[kind.value for kind in ArmKind]))
    assert [arm.name for arm in build_arms(study)] == [
        "dense",
        "dense-iso-flop-s75",
        "dense-iso-flop-tokens-s75",
        "sw-s75-set",
        "dense-iso-time-s75",
    ]


def test_shipped_study_configs_load():
    for name in ("study-cpu-small", "study-cpu-20tpp", "study-gpu-gpt3-small"):
        study = load_study_config(name)
        assert study.study.seeds and build_arms(study)


# ---------------------------------------------------------------------------------------------- FLOPs
def test_flop_columns_equal_plan_and_dense_iso_flop_matches_sparse_wide_total():
    study = load_study_config("study-gpu-gpt3-small")
    arms = {a.name: a for a in build_arms(study)}
    for arm in arms.values():
        if arm.steps is None:
            continue
        acc, p = arm_accounting(study, arm), arm.pretrain_config("unused", 0).plan(0.4, 989.0)
        assert acc.flops_per_token.forward_ideal == p["forward_flops_per_token"]
        assert acc.flops_per_token.forward_executed == p["forward_flops_per_token_executed"]
        assert acc.training_flops_ideal == p["training_flops"]
        assert acc.training_flops_executed == p["training_flops_executed"]
        assert acc.params_total == p["parameters_total"] and acc.params_active == p["parameters_active"]
        assert acc.tokens == p["training_tokens"]
    for s in study.study.sparsities:
        tag = round(s * 100)
        sw = arm_accounting(study, arms[f"sw-s{tag}-set"])
        iso = arm_accounting(study, arms[f"dense-iso-flop-s{tag}"])
        iso_tokens = arm_accounting(study, arms[f"dense-iso-flop-tokens-s{tag}"])
        dense = arm_accounting(study, arms["dense"])
        # total ideal FLOPs equal (LM head and attention included); Sparse Wide costs more than dense in total
        assert iso.flops_per_token.forward_ideal == pytest.approx(sw.flops_per_token.forward_ideal, rel=1e-4)
        assert sw.flops_per_token.forward_ideal > dense.flops_per_token.forward_ideal * 1.01
        # the same total spent on tokens: the dense base's widths, more steps, total FLOPs within one step
        assert (iso_tokens.d_model, iso_tokens.d_ff) == (dense.d_model, dense.d_ff)
        assert iso_tokens.steps > dense.steps
        one_step = dense.flops_per_token.training_ideal * dense.tokens_per_step
        assert abs(iso_tokens.training_flops_ideal - sw.training_flops_ideal) <= one_step / 2
        # ... while its block layers are iso-FLOP with the dense ones (the paper's accounting)
        assert sw.flops_per_token.block_layers_forward == pytest.approx(
            dense.flops_per_token.block_layers_forward, rel=0.02
        )
        assert iso.layer_sparsity == 0 and iso.d_model % 12 == 0
        # masked-dense Sparse Wide executes k² = 1/(1-s) times the block FLOPs
        sw_shape = arms[f"sw-s{tag}-set"].pretrain_config("u", 0).model_config().shape(seq_len=2048)
        c = count_flops(sw_shape)
        assert c.sparse_matmul_executed / c.sparse_matmul == pytest.approx(1 / (1 - s), rel=1e-3)


def test_plan_paper_scale_prints_every_arm(capsys):
    assert main(["plan", "--study", "study-gpu-gpt3-small", "--paper-scale", "--mfu", "0.4"]) == 0
    out = capsys.readouterr().out
    for arm in ("dense ", "dense-iso-flop-s50", "dense-iso-flop-tokens-s50", "sw-s75-srigl", "dense-iso-time-s75"):
        assert arm in out
    assert "2.5e+09" in out and "GPU-hours" in out


# ---------------------------------------------------------------------------------------------- data hygiene
def test_budget_beyond_the_corpus_is_refused_or_warned(tmp_path):
    tree = tiny_study(tmp_path, arms=["dense"])
    tree["base"]["train"]["max_steps"] = 2000  # 2000 x 4 x 32 = 256k tokens > the built-in 196k
    study = build_study_config(tree)
    arms = build_arms(study)
    with pytest.raises(runner.RepeatedDataError, match=r"epochs.*allow_repeated_data"):
        runner.check_data(study, arms)
    tree["study"]["allow_repeated_data"] = True
    report = runner.check_data(build_study_config(tree), arms)
    assert report["repeated_epochs"] and 1.2 < report["epochs_max_arm"] < 1.4 and "warning" in report
    tree["base"]["train"]["max_steps"] = 100
    report = runner.check_data(build_study_config(tree), build_arms(build_study_config(tree)))
    assert not report["repeated_epochs"] and report["tokens_in_one_epoch"] is None


# ---------------------------------------------------------------------------------------------- spectral gap
def test_ramanujan_gap_of_known_graphs():
    full = mask_graph_stats(torch.ones(8, 24, dtype=torch.bool))
    # complete bipartite K_{24,8}: σ1 = sqrt(8·24), σ2 = 0, d = 2·192/32
    assert full["mu0"] == pytest.approx(math.sqrt(192)) and full["mu_hat"] == pytest.approx(0, abs=1e-9)
    assert full["ramanujan_gap"] == pytest.approx(2 * math.sqrt(12 - 1))
    g = torch.Generator().manual_seed(0)
    random = torch.rand(64, 64, generator=g) < 0.25
    blocks = torch.zeros(64, 64, dtype=torch.bool)  # two disconnected halves of the same density
    blocks[:32, :32] = torch.rand(32, 32, generator=g) < 0.5
    blocks[32:, 32:] = torch.rand(32, 32, generator=g) < 0.5
    r, b = mask_graph_stats(random), mask_graph_stats(blocks)
    assert b["mu_hat"] > 0.9 * b["mu0"]  # a disconnected graph has a second trivial eigenvalue
    assert r["ramanujan_gap"] > b["ramanujan_gap"] + 3
    w = mask_graph_stats(random, torch.randn(64, 64, generator=g))
    assert "weighted_spectral_gap" in w
    m = torch.randn(50, 30, generator=g)
    assert top_singular_values(m) == pytest.approx(torch.linalg.svdvals(m.double())[:2].tolist())


def test_dst_updates_report_the_spectral_gap_when_asked(tiny_model):
    from hf_sparse_ift.sparsity.dst import DSTConfig, DSTEngine, summarize

    engine = DSTEngine(tiny_model, None, DSTConfig(method="set", update_interval=1, spectral_gap=True), total_steps=10)
    telemetry = engine.step()
    assert all("ramanujan_gap" in s and "weighted_spectral_gap" in s for s in telemetry["layers"].values())
    assert "dst/mean_ramanujan_gap" in summarize(telemetry)
    quiet = DSTEngine(tiny_model, None, DSTConfig(method="set", update_interval=1), total_steps=10).step()
    assert not any("ramanujan_gap" in s for s in quiet["layers"].values())


# ---------------------------------------------------------------------------------------------- verdict
def _arm(study, name, losses):
    arm = {a.name: a for a in build_arms(study)}[name]
    arm.steps = arm.steps or 10
    runs = [
        RunResult(seed, "x", arm.steps, 0, 1.0 * arm.steps, None, loss, None, [], source="test")
        for seed, loss in enumerate(losses)
    ]
    return ArmResult(arm.name, arm.kind, arm.sparsity, arm.method, [], arm_accounting(study, arm), runs)


def test_verdict_reports_every_control_the_margins_and_the_seed_spread(tmp_path):
    study = build_study_config(tiny_study(tmp_path, arms=[kind.value for kind in ArmKind], methods=["static", "set"]))
    rows = [
        _arm(study, "dense", [4.0, 4.02, 4.01]),
        _arm(study, "dense-iso-flop-s75", [3.85, 3.86, 3.84]),
        _arm(study, "dense-iso-flop-tokens-s75", [3.70, 3.71, 3.69]),
        _arm(study, "sw-s75-static", [3.9, 3.91, 3.92]),
        _arm(study, "sw-s75-set", [3.80, 3.81, 3.79]),
        _arm(study, "dense-iso-time-s75", [3.60, 3.61, 3.62]),
    ]
    v = verdict(rows, iso_time_method="set")
    assert [line.split(" — ")[0] for line in v.lines] == [
        "iso-block-FLOP",
        "iso-total-FLOP, wider",
        "iso-total-FLOP, more tokens",
        "iso-time",
        "dynamic vs static masks",
    ]
    text = "\n".join(v.lines)
    assert "**sw-s75-set** beats dense by 0.2100" in text
    assert "**sw-s75-set** beats dense-iso-flop-s75 by 0.0500" in text and "exceeds the seed spread" in text
    assert "**dense-iso-flop-tokens-s75** beats sw-s75-set by 0.1000" in text
    assert "**dense-iso-time-s75** beats sw-s75-set by 0.1900" in text
    assert "**sw-s75-set** beats sw-s75-static by 0.1100" in text
    # every Sparse Wide arm is compared with every FLOP control (the best first); iso-time only with its reference
    kinds = [(c.kind, c.arm, c.control) for c in v.comparisons]
    assert kinds[:2] == [
        (ComparisonKind.ISO_BLOCK_FLOP, "sw-s75-set", "dense"),
        (ComparisonKind.ISO_BLOCK_FLOP, "sw-s75-static", "dense"),
    ]
    assert [k for k in kinds if k[0] is ComparisonKind.ISO_TIME] == [
        (ComparisonKind.ISO_TIME, "sw-s75-set", "dense-iso-time-s75")
    ]
    assert len(v.comparisons) == 2 + 2 + 2 + 1 + 1
    within = compare(
        ComparisonKind.ISO_BLOCK_FLOP,
        _arm(study, "sw-s75-set", [3.0, 3.1, 3.2]),
        _arm(study, "dense", [3.05, 3.15, 3.25]),
    )
    assert within.exceeds_seed_spread is False
    one_seed = verdict([_arm(study, "dense", [4.0]), _arm(study, "sw-s75-set", [4.1])], iso_time_method="set")
    assert "**dense** beats sw-s75-set" in one_seed.lines[0] and "only one seed" in one_seed.lines[0]


def test_block_arms_have_their_own_iso_time_control_and_comparisons():
    from hf_sparse_ift.study.arms import iso_time_reference

    all_kinds = [kind.value for kind in ArmKind]
    study = build_study_config(
        tiny_study("unused", arms=all_kinds, methods=["static", "set", "srigl"], block_sizes=[8])
    )
    arms = {arm.name: arm for arm in build_arms(study)}
    assert list(arms) == [
        "dense",
        "dense-iso-flop-s75",
        "dense-iso-flop-tokens-s75",
        "sw-s75-static",
        "sw-s75-set",
        "sw-s75-srigl",
        "sw-s75-block8-static",  # SRigL trains single weights only: no block arm for it
        "sw-s75-block8-set",
        "dense-iso-time-s75",
        "dense-iso-time-s75-block8",
    ]
    block_config = arms["sw-s75-block8-set"].model_config()
    assert block_config.sparsity_block == 8 and block_config.width_multiple == 8 and block_config.hidden_size % 8 == 0
    masked_reference = iso_time_reference(study, arms["dense-iso-time-s75"])
    block_reference = iso_time_reference(study, arms["dense-iso-time-s75-block8"])
    assert masked_reference.name == "sw-s75-set" and "sparsity_block" not in masked_reference.tree["model"]
    assert block_reference.name == "sw-s75-block8-set" and block_reference.tree["model"]["sparsity_block"] == 8

    def arm(name, losses):
        result = _arm(study, name, losses)
        result.block = arms[name].block
        return result

    rows = [
        arm("dense", [4.0, 4.01]),
        arm("sw-s75-static", [3.9, 3.91]),
        arm("sw-s75-set", [3.8, 3.81]),
        arm("sw-s75-block8-static", [3.95, 3.96]),
        arm("sw-s75-block8-set", [3.85, 3.86]),
        arm("dense-iso-time-s75", [3.6, 3.61]),
        arm("dense-iso-time-s75-block8", [3.9, 3.91]),
    ]
    v = verdict(rows, iso_time_method="set")
    iso_time = [(c.arm, c.control) for c in v.comparisons if c.kind is ComparisonKind.ISO_TIME]
    assert iso_time == [("sw-s75-set", "dense-iso-time-s75"), ("sw-s75-block8-set", "dense-iso-time-s75-block8")]
    text = "\n".join(v.lines)
    assert "**sw-s75-block8-set** beats dense-iso-time-s75-block8 by 0.0500" in text and "8x8 blocks" in text
    assert "**sw-s75-block8-set** beats sw-s75-block8-static by 0.1000" in text
    block_vs_dense = [c for c in v.comparisons if c.kind is ComparisonKind.ISO_BLOCK_FLOP and "block8" in c.arm]
    assert [c.arm for c in block_vs_dense] == ["sw-s75-block8-set", "sw-s75-block8-static"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_sizes": [1]}, "study.block_sizes[]=1 is invalid"),
        ({"block_sizes": [8, 8]}, "each block size may appear once"),
        ({"block_sizes": [8], "methods": ["srigl"], "iso_time_method": "srigl"}, "holds none of them"),
        # round 3: a block the widths cannot hold iso-FLOP (widths 48/144 in 48-blocks: one block per attention
        # linear, none active at the calibrated sparsity) is refused, never compared as if iso-FLOP
        ({"block_sizes": [48]}, "study.block_sizes[]=48 is invalid: at sparsity 0.75, sparsity_block=48 is invalid"),
        ({"block_sizes": [12]}, "widths d_model=36, d_ff=132 the sparse layers cost 1.031x the dense model's FLOPs"),
    ],
)
def test_bad_block_sizes_are_refused(change, message):
    with pytest.raises(ValueError) as err:
        build_study_config(tiny_study("unused", **change))
    assert message in str(err.value)


# ---------------------------------------------------------------------------------------------- end to end
def test_smoke_study_files_invariants_skip_and_resume(tmp_path, monkeypatch):
    batches, calls = {}, []
    from hf_sparse_ift.data import pipeline as data

    original_next, original_pretrain = data.Batches.__next__, runner.pretrain
    current = {"run": "calibration"}  # the calibration times real training steps, on the real data stream

    def recording_next(self):
        batch = original_next(self)
        batches.setdefault(current["run"], []).append(hashlib.sha256(batch.numpy().tobytes()).hexdigest())
        return batch

    def recording_pretrain(cfg, resume=False):
        current["run"] = cfg.train.output_dir
        calls.append((cfg.train.output_dir.split("runs/")[1], resume))
        return original_pretrain(cfg, resume=resume)

    monkeypatch.setattr(data.Batches, "__next__", recording_next)
    monkeypatch.setattr(runner, "pretrain", recording_pretrain)
    out = tmp_path / "study"
    study = build_study_config(tiny_study(out))
    results = runner.run_study(study)

    for name in (
        "results.json",
        "results.md",
        "loss_vs_flops.png",
        "final_loss_vs_sparsity.png",
        "spectral_gap.png",
        "calibration.json",
        "data_check.json",
    ):
        assert (out / name).stat().st_size > 0, name
    arms = {a["name"]: a for a in results["arms"]}
    assert set(arms) == {"dense", "sw-s75-set", "dense-iso-time-s75"}
    # equal token budget and identical data order for the iso-token arms
    assert arms["dense"]["accounting"]["tokens"] == arms["sw-s75-set"]["accounting"]["tokens"] == 4 * 4 * 32
    assert all(r["tokens"] == arms[n]["accounting"]["tokens"] for n in ("dense", "sw-s75-set") for r in arms[n]["runs"])
    dense_run, sw_run = str(out / "runs/dense/seed-0"), str(out / "runs/sw-s75-set/seed-0")
    assert len(batches[dense_run]) == 4 and batches[dense_run] == batches[sw_run]
    iso = arms["dense-iso-time-s75"]
    cal = json.loads((out / "calibration.json").read_text())["arms"]["dense-iso-time-s75"]
    iso_steps = iso["accounting"]["steps"]
    assert iso_steps == max(1, round(4 * cal["ratio"])) and iso["accounting"]["tokens"] == iso_steps * 128
    iso_batches = batches[str(out / "runs/dense-iso-time-s75/seed-0")]  # its length follows the measured ratio
    assert len(iso_batches) == iso_steps and iso_batches[:4] == batches[dense_run][: len(iso_batches)]
    # the table's FLOP columns are plan's numbers
    for arm in build_arms(study):
        if arm.name in arms and arm.steps is not None:
            p = arm.pretrain_config("x", 0).plan(0.4, 989.0)
            flops = arms[arm.name]["accounting"]["flops_per_token"]
            assert flops["training_ideal"] == 3 * p["forward_flops_per_token"]
            assert flops["training_executed"] == 3 * p["forward_flops_per_token_executed"]
    # the wall-clock curve is the runs' running time, logged beside each validation loss
    for name in arms:
        run = arms[name]["runs"][0]
        seconds = [p["wall_seconds"] for p in run["val_curve"]]
        assert seconds[0] == 0 and seconds == sorted(seconds) and 0 < seconds[-1] <= run["wall_seconds"]
    assert [c["calibrated_ratio"] for c in results["iso_time_check"]] == [cal["ratio"]]
    assert results["iso_time_check"][0]["measured_ratio"] > 0
    md = (out / "results.md").read_text()
    assert "| sw-s75-set | 32 / 128 | 0.7500 |" in md and "## Verdict" in md and "(n=1)" in md
    spectral = arms["sw-s75-set"]["runs"][0]["spectral"]["ramanujan_gap"]
    assert next(s for s, _ in spectral) == 0 and [s for s, _ in spectral][-1] == 4 and len(spectral) >= 3

    # a second start without --resume is refused; with --resume finished runs are skipped, a run killed after
    # a checkpoint is resumed and one killed before any checkpoint starts over
    with pytest.raises(FileExistsError, match="--resume"):
        runner.run_study(study)
    (out / "runs/sw-s75-set/seed-0/train_summary.json").unlink()
    for p in (out / "runs/dense/seed-0").iterdir():
        if p.name.startswith("checkpoint-") or p.name == "train_summary.json":
            import shutil

            shutil.rmtree(p) if p.is_dir() else p.unlink()
    calls.clear()
    results = runner.run_study(study, resume=True)
    assert sorted(calls) == [("dense/seed-0", False), ("sw-s75-set/seed-0", True)]
    assert {a["name"]: a["final_val_loss"]["n"] for a in results["arms"]} == {
        "dense": 1,
        "sw-s75-set": 1,
        "dense-iso-time-s75": 1,
    }
    # a changed study cannot resume into the same folder
    changed = tiny_study(out)
    changed["base"]["optim"]["lr"] = 1e-3
    with pytest.raises(ValueError, match="differs from the study config"):
        runner.run_study(build_study_config(changed), resume=True)


# ---------------------------------------------------------------------------------------------- study folder
@pytest.fixture
def no_plots(monkeypatch):
    """The folder-integrity tests check what is written and refused; the figures (seconds of matplotlib each
    time) are checked by the smoke study."""
    from hf_sparse_ift.study import report

    monkeypatch.setattr(report, "plots", lambda out, arms: [])


def _write_yaml(path, tree):
    import yaml

    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _fake_run(folder, steps, final_loss, wall_seconds=2.0):
    """A finished run's train_summary.json (no tracker events): what read_run needs."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "steps": steps,
        "tokens": steps * 128,
        "wall_seconds": wall_seconds,
        "val_loss": [[0, 8.3], [steps, final_loss]],
        "final_train_loss": final_loss + 0.1,
        "tokens_per_s": 100.0,
    }
    (folder / "train_summary.json").write_text(json.dumps(summary))


def _fake_study(out, **settings):
    """A study folder as `study` leaves it, with finished runs for dense, sw-s75-set and dense-iso-time-s75 (8 steps
    from a hand-written calibration), without training anything."""
    tree = tiny_study(out, spectral_gap=False, **settings)
    study = build_study_config(tree)
    runner._check_folder(study, out, resume=False)
    calibration = {
        "method": "by hand",
        "device": "cpu",
        "arms": {
            "dense-iso-time-s75": {
                "reference_arm": "sw-s75-set",
                "reference_steps": 4,
                "steps": 8,
                "dense_seconds_per_step": 0.5,
                "sparse_wide_seconds_per_step": 1.0,
                "ratio": 2.0,
            }
        },
    }
    (out / "calibration.json").write_text(json.dumps(calibration))
    for name, steps, loss in (("dense", 4, 7.0), ("sw-s75-set", 4, 6.5), ("dense-iso-time-s75", 8, 6.0)):
        _fake_run(out / "runs" / name / "seed-0", steps, loss)
    return tree


def _finished(results_json) -> dict:
    return {a["name"]: [r["seed"] for r in a["runs"]] for a in json.loads(results_json.read_text())["arms"]}


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_report_only_on_a_folder_without_a_study_says_run_it_first(tmp_path, capsys, make):
    out = tmp_path / "nothing"
    if make == "empty":
        out.mkdir()
    config = _write_yaml(tmp_path / "study.yaml", tiny_study(out))
    assert main(["study", "--config", config, "--report-only"]) == 2
    assert f"no study in {out}; run it first" in capsys.readouterr().err
    assert (not out.exists()) if make == "missing" else list(out.iterdir()) == []


def test_report_only_refuses_a_different_config_naming_the_keys_and_accepts_the_folder_spelled_otherwise(
    tmp_path, no_plots, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "X"
    tree = _fake_study(out)
    for spelling in ("X", "./X", "X/", str(out)):
        assert (
            main(
                [
                    "study",
                    "--config",
                    _write_yaml(tmp_path / "same.yaml", tree),
                    "--report-only",
                    "--output-dir",
                    spelling,
                ]
            )
            == 0
        )
    written = {name: (out / name).read_bytes() for name in ("results.json", "results.md")}
    changed = copy.deepcopy(tree)
    changed["base"]["optim"]["lr"] = 1e-3
    changed["study"]["seeds"] = [0, 1]
    assert main(["study", "--config", _write_yaml(tmp_path / "changed.yaml", changed), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "differs from the study config given now in ['base.optim.lr', 'study.seeds']" in err
    assert {name: (out / name).read_bytes() for name in written} == written
    # --resume names the keys too
    with pytest.raises(ValueError, match=r"in \['base.optim.lr', 'study.seeds'\]"):
        runner.run_study(build_study_config(changed), resume=True)


def test_report_only_never_loses_finished_runs(tmp_path, no_plots):
    out = tmp_path / "study"
    tree = _fake_study(out)
    study = build_study_config(tree)
    runner.report_only(study)
    every_run = {"dense": [0], "sw-s75-set": [0], "dense-iso-time-s75": [0]}
    assert _finished(out / "results.json") == every_run
    # runs/ gone (a copy of the results): the runs results.json recorded stay, marked as such
    import shutil

    shutil.rmtree(out / "runs")
    results = runner.report_only(study)
    assert _finished(out / "results.json") == every_run
    assert {r["source"] for a in results["arms"] for r in a["runs"]} == {"an earlier results.json (run folder gone)"}
    assert "| dense-iso-time-s75 |" in (out / "results.md").read_text()
    assert "7.0000 ± n/a (n=1, 1 from results.json)" in (out / "results.md").read_text()
    # calibration.json gone as well: the iso-time arm cannot be reported, so nothing is replaced
    (out / "calibration.json").unlink()
    before = (out / "results.json").read_bytes(), (out / "results.md").read_bytes()
    with pytest.raises(ValueError, match=r"holds 3 finished runs but a report now would hold 2: \['dense-iso-time"):
        runner.report_only(study)
    assert ((out / "results.json").read_bytes(), (out / "results.md").read_bytes()) == before


def test_the_shipped_cpu_small_results_are_regenerated_without_losing_a_run(tmp_path, no_plots):
    import shutil
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs" / "study-cpu-small"
    copy_of_docs = tmp_path / "study-cpu-small"
    shutil.copytree(docs, copy_of_docs)
    results = runner.report_only(load_study_config("study-cpu-small", str(copy_of_docs)))
    assert {a["name"]: len(a["runs"]) for a in results["arms"]} == {
        "dense": 3,
        "dense-iso-flop-s75": 3,
        "sw-s75-static": 3,
        "sw-s75-set": 3,
        "dense-iso-time-s75": 3,
    }
    old = json.loads((docs / "results.json").read_text())
    old_losses = {a["name"]: a["final_val_loss"]["mean"] for a in old["arms"]}
    assert {a["name"]: a["final_val_loss"]["mean"] for a in results["arms"]} == old_losses
    assert "1.2 tokens per non-embedding parameter (200,064) and 0.52 per parameter" in results["verdict"]["lines"][0]


def test_the_shipped_20tpp_results_regenerate_with_every_arm_and_a_plot_series_per_layout(tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    from hf_sparse_ift.study import plots

    legends = {}
    save = plots._save

    def save_and_read_legends(plt, fig, out, name):
        legends[name] = [text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()]
        return save(plt, fig, out, name)

    monkeypatch.setattr(plots, "_save", save_and_read_legends)
    docs = Path(__file__).resolve().parents[2] / "docs" / "study-cpu-20tpp"
    copy_of_docs = tmp_path / "study-cpu-20tpp"
    shutil.copytree(docs, copy_of_docs)
    results = runner.report_only(load_study_config("study-cpu-20tpp", str(copy_of_docs)))
    old = json.loads((docs / "results.json").read_text())
    assert {a["name"]: len(a["runs"]) for a in results["arms"]} == {a["name"]: 2 for a in old["arms"]}
    assert len(old["arms"]) == 9
    assert {a["name"]: a["final_val_loss"]["mean"] for a in results["arms"]} == {
        a["name"]: a["final_val_loss"]["mean"] for a in old["arms"]
    }
    assert "20.1 tokens per non-embedding parameter (50,880) and 5.50 per parameter" in results["verdict"]["lines"][0]
    # every arm on the curves; the block arms and their iso-time control as series of their own on the final loss
    assert len(legends["loss_vs_flops.png"]) == 9
    assert {
        "Sparse Wide + set",
        "Sparse Wide + set, 16x16 blocks",
        "Sparse Wide + static, 16x16 blocks",
        "dense, SW's wall-clock",
        "dense, SW's wall-clock (16x16 blocks)",
    } <= set(legends["final_loss_vs_sparsity.png"])


def test_one_process_per_study_folder(tmp_path, no_plots, caplog):
    import os
    import socket
    import subprocess
    import sys

    out = tmp_path / "study"
    study = build_study_config(_fake_study(out))
    live = os.getppid()
    (out / ".lock").write_text(json.dumps({"pid": live, "host": socket.gethostname()}))
    with pytest.raises(FileExistsError, match=rf"in use by another run \(process {live} on .*study.output_dir"):
        runner.report_only(study)
    with pytest.raises(FileExistsError, match=rf"process {live}"):
        runner.run_study(study, resume=True)
    assert not (out / "results.json").exists()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = int(finished.stdout)
    (out / ".lock").write_text(json.dumps({"pid": stale, "host": socket.gethostname()}))
    runner.report_only(study)
    assert f"taking over the stale lock {out / '.lock'} of process {stale}" in caplog.text
    assert (out / "results.json").exists() and not (out / ".lock").exists()


def test_a_run_folder_a_live_process_holds_is_never_deleted(tmp_path):
    import os
    import socket

    folder = tmp_path / "runs" / "dense" / "seed-0"
    folder.mkdir(parents=True)
    (folder / "events.out.tfevents.1").write_text("live")
    (folder / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(FileExistsError, match=f"process {os.getppid()}"):
        runner._clear_run_folder(folder)
    assert (folder / "events.out.tfevents.1").read_text() == "live"
    (folder / ".lock").unlink()
    runner._clear_run_folder(folder)
    assert list(folder.iterdir()) == []


def test_wall_clock_of_a_resumed_run_counts_only_running_time(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from hf_sparse_ift.study.results import read_run

    study = build_study_config(tiny_study(tmp_path, arms=["dense"]))
    arm = build_arms(study)[0]
    folder = arm.run_dir(study, 0)
    _fake_run(folder, 4, 6.0, wall_seconds=3.0)
    accounting = arm_accounting(study, arm)
    without_tracker = read_run(study, arm, 0, accounting)
    assert [p.wall_seconds for p in without_tracker.val_curve] == [0.0, 3.0]  # running time spread over steps
    # first process: steps 0 and 2; stopped for 1000 s; the resumed process: step 4
    for walltime_offset, points in ((0.0, [(0, 0.0), (2, 1.0)]), (1000.0, [(4, 2.5)])):
        writer = SummaryWriter(str(folder / "tb"))
        for step, running in points:
            writer.add_scalar("val/loss", 7.0 - step / 4, step, walltime=1e9 + walltime_offset + running)
            writer.add_scalar("val/running_seconds", running, step, walltime=1e9 + walltime_offset + running)
        writer.close()
    run = read_run(study, arm, 0, accounting)
    assert [(p.step, p.wall_seconds) for p in run.val_curve] == [(0, 0.0), (2, 1.0), (4, 2.5)]
    assert [p.loss for p in run.val_curve] == [8.3, 6.5, 6.0]  # the summary's where it has them


def test_base_by_name_must_be_dense_and_the_documented_example_loads(tmp_path):
    from hf_sparse_ift.study import config

    assert "base: pretrain-gpt3-small-dense" in config.__doc__
    tree = tiny_study(tmp_path)
    tree["base"] = "pretrain-gpt3-small-dense"
    assert build_study_config(tree).base.model_config().sparsity == 0
    tree["base"] = "pretrain-tiny"
    with pytest.raises(ValueError, match=r"base: pretrain-tiny is a sparse config: name a dense one"):
        build_study_config(tree)


def test_an_implausible_calibration_is_warned_with_its_numbers(tmp_path, monkeypatch, caplog):
    study = build_study_config(tiny_study(tmp_path))
    arms = build_arms(study)
    seconds = {False: 1.0, True: 0.72}  # keyed by "is the Sparse Wide model"

    def timed(cfg, steps, warmup):
        return [seconds[cfg.model_config().sparsity > 0]] * steps

    monkeypatch.setattr(runner, "time_training_steps", timed)
    tmp_path.mkdir(exist_ok=True)
    calibration = runner.calibrate_iso_time(study, arms, tmp_path)
    expected = (
        "implausible iso-time calibration for dense-iso-time-s75: masked Sparse Wide took 0.7200 s/step and dense "
        "1.0000 s/step (ratio 0.720 < 1)"
    )
    assert calibration["warnings"][0].startswith(expected) and expected in caplog.text
    assert json.loads((tmp_path / "calibration.json").read_text())["warnings"] == calibration["warnings"]
    seconds[True] = 2.0
    (tmp_path / "calibration.json").unlink()
    assert runner.calibrate_iso_time(study, arms, tmp_path)["warnings"] == []


def test_calibration_times_the_training_loops_own_step(tmp_path, monkeypatch):
    study = build_study_config(tiny_study(tmp_path))
    calls = []
    from hf_sparse_ift.training import loop

    real_step = loop.train_step

    def counted(session):
        calls.append(session.run.config.train.output_dir)
        return real_step(session)

    monkeypatch.setattr(loop, "train_step", counted)
    cfg = build_arms(study)[0].pretrain_config(str(tmp_path / "calibration-runs" / "dense"), 0)
    cfg.train.trackers = []
    times = runner.time_training_steps(cfg, steps=2, warmup=1)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert calls == [str(tmp_path / "calibration-runs" / "dense")] * 3


def test_a_stopped_and_resumed_run_logs_only_its_running_time(tmp_path):
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hf_sparse_ift.study.results import read_scalars
    from hf_sparse_ift.training.config import build_pretrain_config
    from hf_sparse_ift.training.loop import pretrain

    def run_config(steps):
        tree = copy.deepcopy(TINY_BASE)
        tree["train"].update(output_dir=str(tmp_path / "run"), max_steps=steps)
        tree["dst"]["method"] = "static"  # the dense base, as the study trains it
        return build_pretrain_config(tree)

    pretrain(run_config(2))
    time.sleep(3)  # the study is stopped
    summary = pretrain(run_config(4), resume=True)
    running = read_scalars(tmp_path / "run", ("val/running_seconds",))["val/running_seconds"]
    assert sorted(running) == [0, 2, 4] and running[0] == 0
    assert running[0] < running[2] < running[4] <= summary["wall_seconds"]
    # the tracker's clock spans the pause; the running time does not
    clock = {}
    for events in (tmp_path / "run").rglob("events.out.tfevents*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "val/loss" in accumulator.Tags()["scalars"]:
            clock.update({e.step: e.wall_time for e in accumulator.Scalars("val/loss")})
    assert (clock[4] - clock[2]) - (running[4] - running[2]) > 3


# ---------------------------------------------------------------------------------------------- round 3
def test_arm_names_are_unique_and_exact_for_any_sparsity():
    from hf_sparse_ift.study.arms import arm_name

    names = {s: arm_name(ArmKind.SPARSE_WIDE, s, "set") for s in (0.75, 0.754, 0.995, 0.001, 0.5, 0.9)}
    assert names == {
        0.75: "sw-s75-set",  # whole percents keep the names of the shipped studies
        0.754: "sw-s75.4-set",
        0.995: "sw-s99.5-set",
        0.001: "sw-s0.1-set",
        0.5: "sw-s50-set",
        0.9: "sw-s90-set",
    }
    study = build_study_config(tiny_study("unused", sparsities=[0.75, 0.754], arms=["sparse-wide", "dense-iso-time"]))
    assert [arm.name for arm in build_arms(study)] == [
        "sw-s75-set",
        "dense-iso-time-s75",
        "sw-s75.4-set",
        "dense-iso-time-s75.4",
    ]
    with pytest.raises(ValueError, match=r"study.sparsities=\[0.75, 0.75000000001\] is invalid: they name the arms"):
        build_study_config(tiny_study("unused", sparsities=[0.75, 0.75000000001]))


def test_an_arm_whose_flops_differ_from_the_control_is_named_not_compared(tmp_path):
    import dataclasses

    study = build_study_config(
        tiny_study(
            tmp_path, arms=["dense", "dense-iso-flop", "sparse-wide"], methods=["static", "set"], block_sizes=[8]
        )
    )
    rows = [
        _arm(study, name, [3.9, 3.91])
        for name in ("dense", "dense-iso-flop-s75", "sw-s75-set", "sw-s75-block8-set", "sw-s75-block8-static")
    ]
    block = rows[3]
    more = dataclasses.replace(block.accounting, training_flops_ideal=1.4 * block.accounting.training_flops_ideal)
    rows[3] = ArmResult(block.name, block.kind, block.sparsity, block.method, [], more, block.runs, block=8)
    rows[4].block = 8
    v = verdict(rows, iso_time_method="set")
    wider = [c.arm for c in v.comparisons if c.kind is ComparisonKind.ISO_TOTAL_FLOP_WIDER]
    assert "sw-s75-block8-set" not in wider and "sw-s75-set" in wider and "sw-s75-block8-static" in wider
    assert any("not compared" in line and "sw-s75-block8-set (+40.0%)" in line for line in v.lines), v.lines


def test_the_report_after_a_changed_calibration_gives_the_steps_that_ran(tmp_path):
    from hf_sparse_ift.study.results import collect

    study = build_study_config(tiny_study(tmp_path))
    arms = build_arms(study)
    iso_time = next(arm for arm in arms if arm.kind is ArmKind.DENSE_ISO_TIME)
    iso_time.steps = 5  # what the new calibration gives
    run = iso_time.run_dir(study, 0)
    run.mkdir(parents=True)
    summary = {"steps": 7, "tokens": 7 * 128, "wall_seconds": 1.0, "val_loss": [[7, 3.5]], "final_train_loss": 3.6}
    (run / "train_summary.json").write_text(json.dumps(summary))
    result = next(r for r in collect(study, arms, calibration=None) if r.name == iso_time.name)
    assert result.accounting.steps == 7 and result.accounting.tokens == 7 * 128
    assert result.runs[0].final_val_loss == 3.5
    assert any("the runs did 7 steps" in note and "now give 5" in note for note in result.notes), result.notes
