"""Hub model cards for Sparse Wide GPT checkpoints, rendered with huggingface_hub's ModelCard."""

from __future__ import annotations

from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig
from ..models.sparse_wide_gpt.iso_flop import count_flops, count_parameters
from ..resources import model_card_template


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
    train = {**train, "max_steps": resolved.get("total_steps", train.get("max_steps")),
             "total_tokens": resolved.get("total_tokens", train.get("total_tokens"))}
    rows = [("dataset", data.get("dataset")), ("tokenizer", data.get("tokenizer")), ("context", data.get("seq_len")),
            ("sequences per step", train.get("global_batch_size")),
            ("steps / tokens", f"{train.get('max_steps')} / {train.get('total_tokens')}"),
            ("optimizer", f"AdamW betas {tuple(optim.get('betas', ()))}, eps {optim.get('eps')}, "
                          f"weight decay {optim.get('weight_decay')}"),
            ("learning rate", f"peak {optim.get('lr')}, warm-up {optim.get('warmup_tokens')} tokens, cosine to "
                              f"{optim.get('min_lr_ratio')} x peak"),
            ("gradient clipping", optim.get("grad_clip")), ("precision", train.get("mixed_precision")),
            ("dynamic sparse training", f"{dst.get('method')}, drop fraction {dst.get('drop_fraction')} (cosine), "
                                        f"every {dst.get('update_interval')} steps until "
                                        f"{dst.get('stop_fraction')} of training")]
    return [(k, str(v)) for k, v in rows]


def render_model_card(checkpoint: str | Path, repo_id: str | None = None, results: list[dict] | None = None,
                      training_config: dict | None = None, license: str = "apache-2.0") -> ModelCard:
    """The card of a `save_pretrained` folder. `results`: rows {task, metric, value, dataset?}."""
    checkpoint = Path(checkpoint)
    c = SparseWideGPTConfig.from_pretrained(checkpoint)
    if training_config is None and (checkpoint / "training_config.yaml").exists():
        training_config = yaml.safe_load((checkpoint / "training_config.yaml").read_text())
    flops, dense = count_flops(c.shape()), count_flops(c.dense_shape())
    params = count_parameters(c.shape(), c.n_positions, c.tie_word_embeddings)
    dense_params = count_parameters(c.dense_shape(), c.n_positions, c.tie_word_embeddings)["total"]
    dataset = ((training_config or {}).get("resolved", {}).get("data") or (training_config or {}).get("data", {})).get("dataset")
    datasets = [dataset] if dataset and dataset != "builtin" else None
    repo_id = repo_id or checkpoint.name
    eval_results = [EvalResult(task_type="text-generation", dataset_type=r.get("dataset", r["task"]),
                               dataset_name=r["task"], metric_type=r["metric"], metric_value=float(r["value"]))
                    for r in results or []]
    dst_method = (training_config or {}).get("dst", {}).get("method")
    card_data = ModelCardData(
        library_name="transformers", license=license, pipeline_tag="text-generation", datasets=datasets,
        tags=["sparse", "sparse-ift", "sparse-wide", "dynamic-sparse-training", "gpt2", "custom_code"]
             + ([dst_method] if dst_method else []),
        model_name=repo_id, eval_results=eval_results or None)
    return ModelCard.from_template(
        card_data, template_path=str(model_card_template()), model_name=repo_id, repo_id=repo_id,
        dst_method=dst_method.upper() if dst_method else None, n_layer=c.n_layer, n_head=c.n_head,
        n_positions=c.n_positions, dense_hidden_size=c.dense_hidden_size,
        dense_intermediate_size=c.dense_intermediate_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, sparsity=c.sparsity, layer_sparsity=f"{c.layer_sparsity:.4f}",
        sparse_layers=", ".join(c.sparse_layers) if c.sparsity > 0 else "none (dense model)",
        dense_params=_human(dense_params), total_params=_human(params["total"]), active_params=_human(params["active"]),
        dense_flops=_human(dense.forward), flops=_human(flops.forward),
        flop_ratio=f"{flops.forward / dense.forward:.2f}",
        block_ratio=f"{flops.sparse_matmul / max(dense.sparse_matmul, 1):.3f}",
        executed_ratio=f"{flops.forward_executed / dense.forward:.2f}",
        recipe=_recipe(training_config),
        results=[{"task": r["task"], "metric": r["metric"], "value": f"{float(r['value']):.4f}"} for r in results or []])


def write_model_card(checkpoint: str | Path, **kwargs) -> Path:
    card = render_model_card(checkpoint, **kwargs)
    path = Path(checkpoint) / "README.md"
    card.save(path)
    return path
