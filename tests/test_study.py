"""`hf-sparse-ift study`: config errors, FLOP columns against `plan`, data hygiene, the spectral gap, and an
end-to-end smoke study (files, equal tokens, equal data order, skip / resume)."""

import copy
import hashlib
import json
import math

import pytest
import torch

from hf_sparse_ift.cli import main, plan
from hf_sparse_ift.models.sparse_wide_gpt.iso_flop import count_flops
from hf_sparse_ift.sparsity.spectral import mask_graph_stats, top_singular_values
from hf_sparse_ift.study import runner
from hf_sparse_ift.study.arms import build_arms, flop_accounting
from hf_sparse_ift.study.config import build_study_config, load_study_config
from hf_sparse_ift.study.report import compare, spread, verdict

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


def test_shipped_study_configs_load():
    for name in ("study-cpu-small", "study-gpu-gpt3-small"):
        study = load_study_config(name)
        assert study.study.seeds and build_arms(study)


# ---------------------------------------------------------------------------------------------- FLOPs
def test_flop_columns_equal_plan_and_dense_iso_flop_matches_sparse_wide_total():
    study = load_study_config("study-gpu-gpt3-small")
    arms = {a.name: a for a in build_arms(study)}
    for arm in arms.values():
        if arm.steps is None:
            continue
        cfg = arm.pretrain_config("unused", 0)
        acc, p = flop_accounting(cfg), plan(cfg, 0.4, 989.0)
        assert acc["flops_per_token"]["forward_ideal"] == p["forward_flops_per_token"]
        assert acc["flops_per_token"]["forward_executed"] == p["forward_flops_per_token_executed"]
        assert acc["training_flops_ideal"] == p["training_flops"]
        assert acc["training_flops_executed"] == p["training_flops_executed"]
        assert acc["params_total"] == p["parameters_total"] and acc["params_active"] == p["parameters_active"]
        assert acc["tokens"] == p["training_tokens"]
    for s in study.study.sparsities:
        tag = round(s * 100)
        sw = flop_accounting(arms[f"sw-s{tag}-set"].pretrain_config("unused", 0))
        iso = flop_accounting(arms[f"dense-iso-flop-s{tag}"].pretrain_config("unused", 0))
        dense = flop_accounting(arms["dense"].pretrain_config("unused", 0))
        # total ideal FLOPs equal (LM head and attention included); Sparse Wide costs more than dense in total
        assert iso["flops_per_token"]["forward_ideal"] == pytest.approx(
            sw["flops_per_token"]["forward_ideal"], rel=1e-4
        )
        assert sw["flops_per_token"]["forward_ideal"] > dense["flops_per_token"]["forward_ideal"] * 1.01
        # ... while its block layers are iso-FLOP with the dense ones (the paper's accounting)
        assert sw["flops_per_token"]["block_layers_forward"] == pytest.approx(
            dense["flops_per_token"]["block_layers_forward"], rel=0.02
        )
        assert iso["layer_sparsity"] == 0 and iso["d_model"] % 12 == 0
        # masked-dense Sparse Wide executes k² = 1/(1-s) times the block FLOPs
        sw_shape = arms[f"sw-s{tag}-set"].pretrain_config("u", 0).model_config().shape(seq_len=2048)
        c = count_flops(sw_shape)
        assert c.sparse_matmul_executed / c.sparse_matmul == pytest.approx(1 / (1 - s), rel=1e-3)


def test_plan_paper_scale_prints_every_arm(capsys):
    assert main(["plan", "--study", "study-gpu-gpt3-small", "--paper-scale", "--mfu", "0.4"]) == 0
    out = capsys.readouterr().out
    for arm in ("dense ", "dense-iso-flop-s50", "sw-s75-srigl", "dense-iso-time-s75"):
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
def _row(name, kind, losses, sparsity=0.75, method="static"):
    return {
        "name": name,
        "kind": kind,
        "sparsity": sparsity,
        "method": method,
        "d_model": 64,
        "steps": 10,
        "final_val_loss": spread(losses),
        "wall_seconds": spread([1.0] * len(losses)),
    }


def test_verdict_reports_winners_margins_and_the_seed_spread():
    assert (
        compare(_row("a", "dense", [3.0, 3.1, 3.2]), _row("b", "dense", [3.05, 3.15, 3.25]))["exceeds_seed_spread"]
        is False
    )
    rows = [
        _row("dense", "dense", [4.0, 4.02, 4.01]),
        _row("sw-s75-static", "sparse-wide", [3.9, 3.91, 3.92]),
        _row("sw-s75-set", "sparse-wide", [3.80, 3.81, 3.79], method="set"),
        _row("dense-iso-flop-s75", "dense-iso-flop", [3.85, 3.86, 3.84]),
    ]
    v = verdict(rows)
    text = "\n".join(v["lines"])
    assert "**sw-s75-set** beats dense by 0.2100" in text
    assert "**sw-s75-set** beats dense-iso-flop-s75 by 0.0500" in text and "exceeds the seed spread" in text
    assert "**sw-s75-set** beats sw-s75-static by 0.1100" in text
    one_seed = verdict([_row("dense", "dense", [4.0]), _row("sw-s75-set", "sparse-wide", [4.1], method="set")])
    assert "**dense** beats sw-s75-set" in one_seed["lines"][0] and "only one seed" in one_seed["lines"][0]


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_smoke_study_files_invariants_skip_and_resume(tmp_path, monkeypatch):
    batches, calls = {}, []
    from hf_sparse_ift.training import data

    original_next, original_pretrain = data.Batches.__next__, runner.pretrain
    current = {}

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
    assert arms["dense"]["tokens"] == arms["sw-s75-set"]["tokens"] == 4 * 4 * 32
    assert all(r["tokens"] == arms[n]["tokens"] for n in ("dense", "sw-s75-set") for r in arms[n]["runs"])
    dense_run, sw_run = str(out / "runs/dense/seed-0"), str(out / "runs/sw-s75-set/seed-0")
    assert len(batches[dense_run]) == 4 and batches[dense_run] == batches[sw_run]
    iso = arms["dense-iso-time-s75"]
    cal = json.loads((out / "calibration.json").read_text())["arms"]["dense-iso-time-s75"]
    assert iso["steps"] == max(1, round(4 * cal["ratio"])) and iso["tokens"] == iso["steps"] * 128
    iso_batches = batches[str(out / "runs/dense-iso-time-s75/seed-0")]  # its length follows the measured ratio
    assert len(iso_batches) == iso["steps"] and iso_batches[:4] == batches[dense_run][: len(iso_batches)]
    # the table's FLOP columns are plan's numbers
    for arm in build_arms(study):
        if arm.name in arms and arm.steps is not None:
            p = plan(arm.pretrain_config("x", 0), 0.4, 989.0)
            assert arms[arm.name]["flops_per_token"]["training_ideal"] == 3 * p["forward_flops_per_token"]
            assert arms[arm.name]["flops_per_token"]["training_executed"] == 3 * p["forward_flops_per_token_executed"]
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
