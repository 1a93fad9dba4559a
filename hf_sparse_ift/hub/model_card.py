"""Hub model cards for Sparse Wide GPT checkpoints, rendered with huggingface_hub's ModelCard."""

from __future__ import annotations

from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..errors import UsageError
from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig
from ..models.sparse_wide_gpt.iso_flop import model_summary
from ..resources import model_card_template
from .identity import model_name


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _recipe(training_config: dict | None) -> list[tuple[str, str]]:
    if not training_config:
        return []
    data, optim, dst, train = (training_config.get(k, {}) for k in ("data", "optim", "dst", "train"))
    resolved = training_config.get("resolved", {})
    data = {**data, **resolved.get("data", {})}  # what the run read, not only what it asked for
    train = {
        **train,
        "max_steps": resolved.get("total_steps", train.get("max_steps")),
        "total_tokens": resolved.get("total_tokens", train.get("total_tokens")),
    }
    rows = [
        ("dataset", data.get("dataset")),
        ("tokenizer", data.get("tokenizer")),
        ("context", data.get("seq_len")),
        ("sequences per step", train.get("global_batch_size")),
        ("steps / tokens", f"{train.get('max_steps')} / {train.get('total_tokens')}"),
        (
            "optimizer",
            f"AdamW betas {tuple(optim.get('betas', ()))}, eps {optim.get('eps')}, "
            f"weight decay {optim.get('weight_decay')}",
        ),
        (
            "learning rate",
            f"peak {optim.get('lr')}, warm-up {optim.get('warmup_tokens')} tokens, cosine to "
            f"{optim.get('min_lr_ratio')} x peak",
        ),
        ("gradient clipping", optim.get("grad_clip")),
        ("precision", resolved.get("mixed_precision", train.get("mixed_precision"))),  # what ran, not "auto"
        (
            "dynamic sparse training",
            f"{dst.get('method')}, drop fraction {dst.get('drop_fraction')} (cosine), "
            f"every {dst.get('update_interval')} steps until "
            f"{dst.get('stop_fraction')} of training",
        ),
    ]
    decided = list(resolved.get("decisions", [])) + list(resolved.get("resume_changes", []))
    if decided:  # every decision the package took for the run (and every change a --resume applied)
        rows.append(("decided for this run", "; ".join(decided).replace("|", "/")))
    return [(k, str(v)) for k, v in rows]


# How the Open LLM Leaderboard names its v2 results in model-index metadata (its results bot writes these).
_V2_CARD = {
    "ifeval": ("IFEval", "inst_level_strict_acc and prompt_level_strict_acc", "strict accuracy"),
    "bbh": ("BBH", "acc_norm", "normalized accuracy"),
    "math_hard": ("MATH Lvl 5", "exact_match", "exact match"),
    "gpqa": ("GPQA", "acc_norm", "acc_norm"),
    "musr": ("MuSR", "acc_norm", "acc_norm"),
    "mmlu_pro": ("MMLU-PRO", "acc", "accuracy"),
}
LEADERBOARD_URL = "https://huggingface.co/docs/leaderboards/open_llm_leaderboard/normalization"


def eval_results(summary: dict) -> list[EvalResult]:
    """model-index entries of one `evaluate` summary (scores in percent; leaderboard-v2: normalised), the partial
    ones (``--limit``) saying so in their metric name."""
    partial = f" (partial: --limit {summary['limit']:g})" if summary.get("partial") else ""
    v2 = summary.get("scoring") == "leaderboard-v2"
    out = []
    for r in summary["tasks"]:
        if r.get("score") is None:
            continue
        shots = r.get("num_fewshot")
        if v2 and r.get("benchmark") in _V2_CARD:
            name, metric_type, metric_name = _V2_CARD[r["benchmark"]]
            name = f"{name} ({shots}-Shot)"
            source = dict(
                source_name="Open LLM Leaderboard v2 normalisation (hf-sparse-ift evaluate)", source_url=LEADERBOARD_URL
            )
        else:
            name, metric_type, metric_name, source = r["task"], r["metric"].split(",")[0], None, {}
        out.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=r.get("dataset") or r["task"],
                dataset_name=name,
                dataset_split=r.get("dataset_split"),
                dataset_args={"num_few_shot": shots} if shots is not None else None,
                metric_type=metric_type,
                metric_value=round(float(r["score"]), 2),
                metric_name=(metric_name or metric_type) + partial,
                **source,
            )
        )
    return out


def _results_section(summary: dict) -> dict:
    v2 = summary.get("scoring") == "leaderboard-v2"
    title = f"`{summary.get('suite_id', summary['suite'])}` suite"
    if v2:
        title += " (Open LLM Leaderboard v2, normalised scores)"
    if summary.get("partial"):
        title += f", partial: first {summary['limit']:g} examples per task"
    rows = [
        {
            "task": r["label"],
            "metric": r["metric"],
            "raw": "n/a" if r.get("value") is None else f"{r['value']:.4f}",
            "score": "not scored" if r.get("score") is None else f"{r['score']:.2f}",
        }
        for r in summary["tasks"]
    ]
    average = "n/a" if summary.get("average") is None else f"{summary['average']:.2f}"
    if not summary.get("complete", True):
        average += f" (over {len(summary['average_over'])} of {len(rows)}: {', '.join(summary['average_over'])})"
    return {
        "title": title,
        "rows": rows,
        "average": average,
        "notes": list(summary.get("missing", {}).values()),
        "settings": f"lm-eval {summary.get('lm_eval_version')}, dtype {summary.get('dtype')}"
        f"{', no chat template' if summary.get('apply_chat_template') is False else ''}",
    }


_STORAGE = {
    None: "Each sparse layer keeps a boolean mask (`weight_mask`) in the checkpoint; inactive weights are exactly zero.",
    "bitmask-values-v1": "Each sparse layer is stored losslessly in the compressed `bitmask-values-v1` layout: its mask "
    "as packed bits and its active weights (exact zeros included); `from_pretrained` rebuilds "
    "the weight and its boolean `weight_mask`, inactive weights exactly zero. "
    "`hf-sparse-ift decompress` writes the plain layout.",
    "condensed-v1": "Each sparse layer is condensed (`condensed-v1`): only its active weights and their input "
    "indices are stored, for inference; neurons without active weights are dropped.",
}


_BLOCK_STORAGE = (
    "Each sparse layer is block-sparse (`sparsity_block` {block}): only its active blocks (`weight_blocks`) and their "
    "index (`block_crow_indices`, `block_col_indices`, BSR layout) are stored, trained and computed with."
)


def _storage(config) -> str:
    if config.uses_blocks:
        return _BLOCK_STORAGE.format(block=config.sparsity_block)
    fmt = config.sparse_format.get("format") if isinstance(config.sparse_format, dict) else None
    if fmt not in _STORAGE:
        raise UsageError(f"sparse_format {fmt!r} has no card text: expected one of {list(_STORAGE)}")
    return _STORAGE[fmt]


def render_model_card(
    checkpoint: str | Path,
    repo_id: str | None = None,
    summaries: list[dict] | None = None,
    training_config: dict | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """The card of a `save_pretrained` folder, named after its training run; `summaries`: `evaluate` summaries
    (their model-index entries and result tables)."""
    checkpoint = Path(checkpoint)
    c = SparseWideGPTConfig.from_pretrained(checkpoint)
    if training_config is None and (checkpoint / "training_config.yaml").exists():
        training_config = yaml.safe_load((checkpoint / "training_config.yaml").read_text())
    m = model_summary(c)
    dataset = ((training_config or {}).get("resolved", {}).get("data") or (training_config or {}).get("data", {})).get(
        "dataset"
    )
    datasets = [dataset] if dataset and dataset != "builtin" else None
    run = Path(str(((training_config or {}).get("train") or {}).get("output_dir") or "")).name
    repo_id = repo_id or run or model_name(checkpoint)
    results = [e for s in summaries or [] for e in eval_results(s)]
    dst_method = (training_config or {}).get("dst", {}).get("method")
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        datasets=datasets,
        tags=["sparse", "sparse-ift", "sparse-wide", "dynamic-sparse-training", "gpt2", "custom_code"]
        + ([dst_method] if dst_method else []),
        model_name=repo_id,
        eval_results=results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template()),
        model_name=repo_id,
        repo_id=repo_id,
        dst_method=dst_method.upper() if dst_method else None,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_positions=c.n_positions,
        dense_hidden_size=c.dense_hidden_size,
        dense_intermediate_size=c.dense_intermediate_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        sparsity=c.sparsity,
        layer_sparsity=f"{c.layer_sparsity:.4f}",
        sparse_layers=", ".join(c.sparse_layers) if c.sparsity > 0 else "none (dense model)",
        dense_params=_human(m["parameters_dense_reference"]),
        total_params=_human(m["parameters_total"]),
        active_params=_human(m["parameters_active"]),
        dense_flops=_human(m["dense_forward_flops_per_token"]),
        flops=_human(m["forward_flops_per_token"]),
        flop_ratio=f"{m['flop_ratio_to_dense']:.2f}",
        block_ratio=f"{m['sparse_layer_flops_per_token'] / max(m['dense_sparse_layer_flops_per_token'], 1):.3f}",
        executed_ratio=f"{m['executed_flop_ratio_to_dense']:.2f}",
        storage=_storage(c),
        recipe=_recipe(training_config),
        result_sections=[_results_section(s) for s in summaries or []],
    )


def write_model_card(checkpoint: str | Path, **kwargs) -> Path:
    card = render_model_card(checkpoint, **kwargs)
    path = Path(checkpoint) / "README.md"
    card.save(path)
    return path
