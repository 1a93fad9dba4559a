"""Held-out next-token loss and perplexity of a checkpoint, on text packed exactly as in training."""

from __future__ import annotations

import math

from ..hub.identity import resolve_model


def check_perplexity_args(model: str, seq_len: int | None, batch_size: int, max_batches: int) -> tuple[dict, int]:
    """The model's identity and the sequence length to use; a ValueError naming the bad value otherwise. Reads
    only the model's config."""
    from transformers import AutoConfig

    import hf_sparse_ift  # noqa: F401  (registers the config class)

    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size} must be at least 1")
    if max_batches < 1:
        raise ValueError(f"--max-batches {max_batches} must be at least 1")
    identity = resolve_model(model)
    config = AutoConfig.from_pretrained(
        identity.get("path") or identity["hub_id"], revision=identity.get("revision"), trust_remote_code=True
    )
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if seq_len is None:
        return identity, positions
    if positions and not 1 <= seq_len <= positions:
        raise ValueError(
            f"--seq-len {seq_len} does not fit the model: it has {positions} positions "
            f"(max_position_embeddings); choose 1 to {positions} (default: {positions})"
        )
    if seq_len < 1:
        raise ValueError(f"--seq-len {seq_len} must be at least 1")
    return identity, seq_len


def perplexity(
    model: str,
    dataset: str = "builtin",
    tokenizer: str | None = None,
    split: str = "validation",
    max_batches: int = 50,
    batch_size: int = 8,
    seq_len: int | None = None,
    data_files: str | None = None,
    text_column: str = "text",
) -> dict:
    """Mean next-token loss and perplexity of `model` on a held-out text stream (packed like training)."""
    identity, seq_len = check_perplexity_args(model, seq_len, batch_size, max_batches)

    import torch
    from transformers import AutoModelForCausalLM

    from ..training.config import DataConfig
    from ..training.data import load_tokenizer, resolve_data_source, validation_batches

    source = identity.get("path") or identity["hub_id"]
    lm = AutoModelForCausalLM.from_pretrained(source, revision=identity.get("revision"), trust_remote_code=True).eval()
    tok = load_tokenizer(tokenizer or str(source))  # checkpoints exported by the trainer carry their tokenizer
    cfg = DataConfig(
        dataset=dataset,
        data_files=data_files,
        text_column=text_column,
        validation_split=split,
        seq_len=seq_len,
        tokenizer=tokenizer or "builtin",
    )
    data = resolve_data_source(cfg)
    batches = validation_batches(data, tok, batch_size, max_batches, rank=0, world_size=1)
    if not batches:
        raise ValueError(
            f"the held-out text of {dataset!r} ({data.describe_validation()}) is shorter than one batch "
            f"of {batch_size}x{seq_len} tokens"
        )
    with torch.no_grad():
        losses = [lm(input_ids=b, labels=b).loss.item() for b in batches]
    loss = sum(losses) / len(losses)
    return {
        "model": str(model),
        "dataset": data.dataset,
        "validation": data.describe_validation(),
        "tokens": len(batches) * batch_size * seq_len,
        "loss": loss,
        "perplexity": math.exp(loss),
    }
