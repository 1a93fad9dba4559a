import pytest

from hf_sparse_ift.training.config import load_pretrain_config


def test_paper_configs_carry_the_recipe():
    for name, sparsity, method in (
        ("pretrain-gpt3-small-dense", 0.0, "static"),
        ("pretrain-gpt3-small-sw50-set", 0.5, "set"),
        ("pretrain-gpt3-small-sw75-set", 0.75, "set"),
    ):
        cfg = load_pretrain_config(name)
        assert cfg.model_config().sparsity == sparsity and cfg.dst.method == method
        assert (cfg.data.seq_len, cfg.train.global_batch_size, cfg.optim.lr) == (2048, 256, 6e-4)
        assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.grad_clip) == (
            (0.9, 0.999),
            1e-8,
            0.1,
            1.0,
        )
        assert cfg.optim.warmup_tokens == 375e6 and cfg.optim.min_lr_ratio == 0.1
        assert cfg.train.total_tokens == 2.5e9
        assert cfg.steps() == 4769 and cfg.warmup_steps() == 715  # 375M / (256·2048) tokens
        assert cfg.data.dataset == "monology/pile-uncopyrighted"


def test_dotted_overrides_are_typed_and_applied():
    cfg = load_pretrain_config(
        "pretrain-tiny",
        ["train.max_steps=7", "dst.method=rigl", "model.sparsity=0.5", "optim.betas=[0.9, 0.95]", "train.trackers=[]"],
    )
    assert cfg.train.max_steps == 7 and cfg.dst.method == "rigl" and cfg.model_config().sparsity == 0.5
    assert cfg.optim.betas == (0.9, 0.95) and cfg.train.trackers == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stepz=3", r"unknown config key\(s\) \['train.max_stepz'\]"),
        ("trainer.max_steps=3", "unknown config key 'trainer.max_steps'"),
        ("train.micro_batch_size=0", r"train.micro_batch_size=0 is invalid"),
        (
            "train.global_batch_size=24",
            r"train.global_batch_size=24 is invalid: must be a multiple of train.micro_batch_size x processes = 16 x 1",
        ),
        ("optim.lr=-1", r"optim.lr=-1 is invalid"),
        ("optim.betas=[0.9]", r"optim.betas=\[0.9\] is invalid"),
        ("train.mixed_precision=fp8", r"train.mixed_precision='fp8' is invalid"),
        ("dst.method=magic", r"dst.method='magic' is invalid"),
        ("model.sparsity=1.2", r"model: SparseWideGPTConfig.sparsity=1.2 is invalid"),
        ("model.n_head=5", r"model: SparseWideGPTConfig.n_head=5 is invalid"),
        ("data.seq_len=4096", r"data.seq_len=4096 is invalid: must be <= model n_positions=128"),
        ("data.prefetch_batches=-1", r"data.prefetch_batches=-1 is invalid: expected an integer >= 0"),
        ("max_steps", "expected section.key=value"),
        ("train.seed=-1x", r"train.seed=.-1x. is invalid"),
    ],
)
def test_bad_configs_are_rejected_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_pretrain_config("pretrain-tiny", [override])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"no config file or preset named 'gpt5'.*pretrain-tiny"):
        load_pretrain_config("gpt5")


def test_cli_rejects_bad_config_before_any_work(capsys, tmp_path):
    from hf_sparse_ift.cli import main

    assert main(["pretrain", f"train.output_dir={tmp_path}/run", "train.seed=-1x", "train.max_stepz=1"]) == 2
    assert "train.max_stepz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_plan_reports_flops_params_and_gpu_hours():
    cfg = load_pretrain_config("pretrain-gpt3-small-sw75-set", ["model.vocab_size=50257"])
    p = cfg.plan(mfu=0.4, peak_tflops=989)
    assert p["parameters_total"] == 420_321_792
    assert p["forward_flops_per_token"] == 475_253_760
    assert p["training_tokens"] == 4769 * 256 * 2048
    assert p["training_flops"] == pytest.approx(3 * 475_253_760 * p["training_tokens"])
    assert p["gpu_hours_at_mfu"] == pytest.approx(p["training_flops"] / (0.4 * 989e12) / 3600)
    assert p["chinchilla_tokens_dense"] == pytest.approx(20 * 125_226_240)
