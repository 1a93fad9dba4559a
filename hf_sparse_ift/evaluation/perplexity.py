"""Held-out next-token loss and perplexity of a checkpoint, on text packed exactly as in training."""

from __future__ import annotations

import math

from ..errors import UsageError
from ..hub.identity import resolve_model


def check_perplexity_args(
    model: str,
    seq_len: int | None,
    batch_size: int,
    max_batches: int,
    dataset: str = "builtin",
    data_files: str | None = None,
    text_column: str = "text",
) -> tuple[dict, int, int | None]:
    """The model's identity, the sequence length to use and the model's vocabulary size; a ValueError naming the
    bad value otherwise. Reads only the model's config."""
    from transformers import AutoConfig

    import hf_sparse_ift  # noqa: F401  (registers the config class)

    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be at least 1")
    if max_batches < 1:
        raise UsageError(f"--max-batches {max_batches} must be at least 1")
    if text_column != "text" and dataset == "builtin" and data_files is None:
        raise UsageError(
            f"--text-column {text_column!r} applies to --data-files or a Hub --dataset; the built-in corpus has "
            "one column, text"
        )
    identity = resolve_model(model)
    config = AutoConfig.from_pretrained(
        identity.get("path") or identity["hub_id"], revision=identity.get("revision"), trust_remote_code=True
    )
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    vocab_size = getattr(config, "vocab_size", None)
    if seq_len is None:
        return identity, positions, vocab_size
    if positions and not 1 <= seq_len <= positions:
        raise UsageError(
            f"--seq-len {seq_len} does not fit the model: it has {positions} positions "
            f"(max_position_embeddings); choose 1 to {positions} (default: {positions})"
        )
    if seq_len < 1:
        raise UsageError(f"--seq-len {seq_len} must be at least 1")
    return identity, seq_len, vocab_size


# The data layer names its settings as pretraining config keys; perplexity's errors name its own flags.
_FLAG_OF_KEY = {
    "data.data_files": "--data-files",
    "data.dataset": "--dataset",
    "data.text_column": "--text-column",
    "data.train_split": "--split",
    "data.validation_split": "--split",
    "data.tokenizer": "--tokenizer",
    "data.bad_text": "--bad-text",
    "data.seq_len": "--seq-len",
}


def _in_flags(err: Exception) -> Exception:
    text = str(err).replace(" and data.offline_fallback is false", "")  # perplexity never falls back
    for key, flag in _FLAG_OF_KEY.items():
        text = text.replace(key, flag)
    return type(err)(text)


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
    bad_text: str = "error",
) -> dict:
    """Mean next-token loss and perplexity of `model` on held-out text, packed like training: the split `split` of
    `dataset`, or every document of `data_files` (read as split `split`)."""
    identity, seq_len, vocab_size = check_perplexity_args(
        model, seq_len, batch_size, max_batches, dataset, data_files, text_column
    )

    import torch
    from transformers import AutoModelForCausalLM

    from ..data.config import BUILTIN, DataConfig
    from ..data.pipeline import load_tokenizer, resolve_data_source, validation_batches
    from .harness import model_tokenizer

    source = identity.get("path") or identity["hub_id"]
    try:
        tok = model_tokenizer(identity, tokenizer, vocab_size) or load_tokenizer(str(source), key="--model")
        if dataset == BUILTIN and data_files is None:
            cfg = DataConfig(validation_split=split, seq_len=seq_len, bad_text=bad_text)
        else:  # the given split (or files) is the held-out text, all of it: nothing is held out of a training split
            cfg = DataConfig(
                dataset=dataset,
                data_files={split: data_files} if data_files else None,
                text_column=text_column,
                train_split=split,
                validation_split=split,
                seq_len=seq_len,
                bad_text=bad_text,
                offline_fallback=False,  # a perplexity of another corpus than --dataset would be no answer
            )
        cfg.validate()
        data = resolve_data_source(cfg)
        batches = validation_batches(data, tok, batch_size, max_batches, rank=0, world_size=1)
    except (ValueError, FileNotFoundError) as err:
        raise _in_flags(err) from None
    if not batches:
        files = f" (files {data.data_files[split]})" if data.data_files else ""
        raise UsageError(
            f"the held-out text of {data.dataset!r}{files}, split {split!r}, is shorter than one batch of "
            f"{batch_size}x{seq_len} tokens; lower --batch-size or --seq-len, or give more text"
        )
    lm = AutoModelForCausalLM.from_pretrained(source, revision=identity.get("revision"), trust_remote_code=True).eval()
    with torch.no_grad():
        losses = [lm(input_ids=b, labels=b).loss.item() for b in batches]
    loss = sum(losses) / len(losses)
    return {
        "model": str(model),
        "dataset": data.dataset,
        "data_files": data.data_files,
        "validation": data.describe_validation(),
        "tokens": len(batches) * batch_size * seq_len,
        "skipped_documents": batches.skipped_documents,
        "loss": loss,
        "perplexity": math.exp(loss),
    }
