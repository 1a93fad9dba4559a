"""The `hf-sparse-ift` command.

    hf-sparse-ift pretrain --config configs/pretrain-tiny.yaml [--resume] [train.max_steps=100 ...]
    hf-sparse-ift plan --config configs/pretrain-gpt3-small-sw75-set.yaml [--mfu 0.4]
    hf-sparse-ift evaluate --model outputs/tiny/checkpoint-300/hf --suite paper
    hf-sparse-ift compare results/dense.json results/sw75.json --paper
    hf-sparse-ift card outputs/tiny/checkpoint-300/hf [--results results.json] [--push-to-hub user/name]

Multi-process: ``accelerate launch scripts/pretrain.py --config ...`` (same arguments as ``pretrain``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_PRETRAIN_CONFIG = "pretrain-tiny"


def _pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a Sparse Wide GPT (use under `accelerate launch` for several processes)",
        description="Pretrain a Sparse Wide GPT from a YAML config. Trailing KEY=VALUE arguments override config "
                    "keys with dotted names, e.g. train.max_steps=100 dst.method=rigl model.sparsity=0.5. "
                    "Config sections: model (a preset name and/or SparseWideGPTConfig fields), data (dataset, "
                    "tokenizer, seq_len, ...), optim (lr, betas, eps, weight_decay, grad_clip, warmup_tokens, "
                    "min_lr_ratio), dst (method static|set|rigl|srigl, drop_fraction, update_interval, "
                    "stop_fraction, seed, ablation_threshold, track_churn), train (output_dir, seed, "
                    "global_batch_size, micro_batch_size, total_tokens, max_steps, mixed_precision, compile, "
                    "gradient_checkpointing, log_interval, eval_interval, eval_batches, checkpoint_interval, "
                    "keep_checkpoints, trackers, project_name, peak_tflops, progress_bar). See configs/*.yaml.")
    p.add_argument("--config", default=DEFAULT_PRETRAIN_CONFIG,
                   help="YAML path or preset name in configs/ (default: %(default)s, the built-in tiny job)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the newest complete checkpoint in train.output_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="parameters, FLOPs and GPU hours of a pretraining config")
    p.add_argument("--config", default=DEFAULT_PRETRAIN_CONFIG, help="YAML path or preset name in configs/")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak, dense bf16 (H100: 989)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def cmd_pretrain(args) -> int:
    from .training.loop import NonFiniteLossError, pretrain
    from .training.config import load_pretrain_config

    cfg = load_pretrain_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    try:
        summary = pretrain(cfg, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"hf-sparse-ift pretrain: stopped: {err}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: summary[k] for k in ("steps", "tokens", "wall_seconds", "dataset", "processes")}))
    return 0


def plan(cfg, mfu: float, peak_tflops: float) -> dict:
    from .models.sparse_wide_gpt.iso_flop import chinchilla_tokens, count_flops, count_parameters

    c = cfg.model_config()
    shape = c.shape(seq_len=cfg.data.seq_len)
    flops, dense = count_flops(shape), count_flops(c.dense_shape(seq_len=cfg.data.seq_len))
    params = count_parameters(shape, c.n_positions, c.tie_word_embeddings)
    dense_params = count_parameters(c.dense_shape(), c.n_positions, c.tie_word_embeddings)
    tokens = cfg.steps() * cfg.train.global_batch_size * cfg.data.seq_len
    total = flops.training * tokens
    executed = flops.training_executed * tokens
    return {
        "widths": f"d_model {c.dense_hidden_size} -> {c.hidden_size}, d_ff {c.dense_intermediate_size} -> "
                  f"{c.intermediate_size}, layer sparsity {c.layer_sparsity:.4f}",
        "parameters_total": params["total"], "parameters_active": params["active"],
        "dense_parameters": dense_params["total"],
        "forward_flops_per_token": flops.forward, "forward_flops_per_token_executed": flops.forward_executed,
        "flop_ratio_to_dense": flops.forward / dense.forward,
        "chinchilla_tokens_active": chinchilla_tokens(params["active"]),
        "chinchilla_tokens_dense": chinchilla_tokens(dense_params["total"]),
        "training_tokens": tokens, "training_steps": cfg.steps(),
        "training_flops": total, "training_flops_executed": executed,
        "gpu_hours_at_mfu": total / (mfu * peak_tflops * 1e12) / 3600,
        "gpu_hours_masked_dense_at_mfu": executed / (mfu * peak_tflops * 1e12) / 3600,
    }


def cmd_plan(args) -> int:
    from .training.config import load_pretrain_config

    cfg = load_pretrain_config(args.config, args.overrides)
    result = plan(cfg, args.mfu, args.peak_tflops)
    width = max(map(len, result))
    for key, value in result.items():
        text = f"{value:,.4g}" if isinstance(value, float) else (f"{value:,}" if isinstance(value, int) else value)
        print(f"{key.ljust(width)}  {text}")
    print(f"(GPU hours assume {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s; 'masked_dense' counts the "
          "FLOPs a GPU executes with masks on dense weights)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-sparse-ift", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _pretrain_parser(sub)
    _plan_parser(sub)
    from .evaluation import harness as evaluation

    evaluation.add_parsers(sub)
    from .sparsity import commands as sparse_commands  # compress / decompress / condense

    sparse_commands.add_parsers(sub)
    args = parser.parse_args(argv)
    handlers = {"pretrain": cmd_pretrain, "plan": cmd_plan, **evaluation.HANDLERS, **sparse_commands.HANDLERS}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"hf-sparse-ift {args.command}: error: {err}", file=sys.stderr)
        return 2



if __name__ == "__main__":
    sys.exit(main())
