"""Saved checkpoints between layouts: plain, compressed (``bitmask-values-v1``) and condensed (``condensed-v1``).

    hf-sparse-ift compress   outputs/run/checkpoint-600/hf outputs/run/compressed
    hf-sparse-ift condense   outputs/run/checkpoint-600/hf outputs/run/condensed   # model.condense() in memory

`convert_checkpoint` re-saves a folder in another layout, `checkpoint_format` reads a folder's layout, and
`condensed_summary` describes a condensed model for reports. The layers and layouts themselves live in the model folder
(`models/sparse_wide_gpt/condensed_linear.py`, `sparse_safetensors.py`) so that checkpoints load with
``trust_remote_code`` where this package is not installed. A condensed checkpoint is an ordinary ``save_pretrained``
folder whose ``config.json`` says ``"sparse_format": {"format": "condensed-v1", "layers": {...}}``, the sizes of each
condensed layer, from which the model builds its condensed layers before loading.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..errors import InputNotFoundError, OutputExistsError, UsageError
from ..models.sparse_wide_gpt.condensed_linear import (
    CONDENSED_FORMAT,
    REPRESENTATIONS,
    CondensedLinear,
    check_representation,
    kernel_available,
)
from ..models.sparse_wide_gpt.sparse_safetensors import BITMASK_FORMAT, PLAIN

__all__ = [
    "CONDENSED_FORMAT",
    "REPRESENTATIONS",
    "CondensedLinear",
    "checkpoint_format",
    "condensed_layers",
    "condensed_summary",
    "convert_checkpoint",
    "kernel_available",
]


def condensed_layers(model: nn.Module) -> dict[str, CondensedLinear]:
    model = getattr(model, "module", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, CondensedLinear)}


def condensed_summary(model: nn.Module) -> dict:
    """Layers, kept rows, stored weights and bytes of the condensed layers (for reports)."""
    layers = condensed_layers(model)
    stored = sum(m.values.numel() for m in layers.values())
    nbytes = sum(t.numel() * t.element_size() for m in layers.values() for t in (m.values, m.col_indices))
    return {
        "layers": len(layers),
        "constant_fan_in_layers": len([m for m in layers.values() if m.fan_in is not None]),
        "rows": sum(m.row_ids.numel() for m in layers.values()),
        "out_features": sum(m.out_features for m in layers.values()),
        "stored_weights": stored,
        "value_and_index_bytes": nbytes,
    }


def _checkpoint_config(path: Path) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise InputNotFoundError(f"{path} is not a save_pretrained folder: it has no config.json")
    return json.loads(config.read_text())


def _layout(config: dict) -> str:
    fmt = config.get("sparse_format")
    return fmt["format"] if isinstance(fmt, dict) and fmt.get("format") else PLAIN


def checkpoint_format(path: str | Path) -> str:
    """``plain``, ``bitmask-values-v1`` or ``condensed-v1``, from a checkpoint folder's config.json."""
    return _layout(_checkpoint_config(Path(path)))


_WRITTEN_BY_SAVE = ("config.json", "generation_config.json", "model.safetensors.index.json")


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    layout: str,
    *,
    overwrite: bool = False,
    representation: str = "auto",
    max_shard_size: str | int = "50GB",
) -> Path:
    """Re-save the checkpoint folder `src` at `dst` as ``layout`` (``plain``, ``bitmask-values-v1`` or
    ``condensed-v1``). Other files (tokenizer, model card, ...) are copied. Every check runs before the model is
    loaded; `dst` is written to a temporary folder next to it and renamed into place, so it is either complete or
    absent, and an existing `dst` is replaced only with `overwrite`."""
    from ..models.sparse_wide_gpt import SparseWideGPTForCausalLM

    src, dst = Path(src), Path(dst)
    _check_conversion(src, dst, layout, overwrite, representation)
    _check_shard_size(max_shard_size)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    except OSError as err:
        raise UsageError(
            f"output {str(dst)!r} is not writable ({err.strerror or err}); choose a folder this process "
            "can create and write"
        ) from None
    try:
        model = SparseWideGPTForCausalLM.from_pretrained(src, dtype="auto").eval()
        if layout == CONDENSED_FORMAT:
            model.condense(representation)
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            model.save_pretrained(tmp, sparse_format=layout, max_shard_size=max_shard_size)
        for item in src.iterdir():
            weights = item.suffix == ".safetensors" or item.name in _WRITTEN_BY_SAVE
            if weights or (tmp / item.name).exists():
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        replace_folder(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dst


def _check_shard_size(max_shard_size: str | int) -> None:
    """``--max-shard-size`` as save_pretrained reads it (a positive byte count, or digits and KB/MB/GB/TB), checked
    before the model is loaded."""
    try:  # the parser save_pretrained itself uses (not public: without it, save_pretrained checks)
        from huggingface_hub.serialization._base import parse_size_to_int
    except ImportError:
        return
    try:
        size = max_shard_size if isinstance(max_shard_size, int) else parse_size_to_int(str(max_shard_size))
    except ValueError:
        size = 0
    if size <= 0:
        raise UsageError(
            f"--max-shard-size {max_shard_size!r} is invalid: expected a positive size with a unit, e.g. 500MB, 5GB"
        )


def _check_conversion(src: Path, dst: Path, layout: str, overwrite: bool, representation: str) -> None:
    layouts = (PLAIN, BITMASK_FORMAT, CONDENSED_FORMAT)
    if layout not in layouts:
        raise UsageError(f"layout={layout!r} is invalid: expected one of {list(layouts)}")
    check_representation(representation)
    config = _checkpoint_config(src)
    held = _layout(config)
    if held == CONDENSED_FORMAT:
        raise UsageError(
            f"{src} is condensed ({CONDENSED_FORMAT}); condensed checkpoints cannot be converted "
            "(keep the masked checkpoint they were made from)"
        )
    if layout == PLAIN and held == PLAIN:
        raise UsageError(f"{src} is not compressed (plain layout): nothing to decompress")
    if layout == BITMASK_FORMAT and held == BITMASK_FORMAT:
        raise UsageError(f"{src} is already compressed ({BITMASK_FORMAT})")
    if config.get("sparsity") and config.get("sparsity_block", 1) not in (1, [1, 1]):
        # Block-sparse checkpoints store only the active blocks and their index: already compact, and not masked.
        raise UsageError(
            f"{src} is block-sparse (sparsity_block={config['sparsity_block']!r}): it already stores only its active "
            f"blocks, and {layout} applies to masked checkpoints; convert it to the masked layout first "
            "(hf_sparse_ift.sparsity.blocks.to_masked_model)"
        )
    if not config.get("sparsity"):
        raise UsageError(
            f"{src} has no sparse layers (sparsity {config.get('sparsity', 0)}): there is nothing to "
            f"convert to {layout}"
        )
    if dst.resolve() == src.resolve():
        raise UsageError(f"output {dst} is the input folder; write to another folder")
    if dst.resolve() in src.resolve().parents:  # --overwrite would delete the input with the folder holding it
        raise UsageError(
            f"output {dst} holds the input folder {src}: replacing it would delete the input; write to a folder "
            "outside the input"
        )
    if src.resolve() in dst.resolve().parents:  # the copy of the input's other files would copy the output too
        raise UsageError(
            f"output {dst} is inside the input folder {src}: the input's files are copied into the output, so it "
            "would copy itself; write to a folder outside the input"
        )
    if dst.exists() and not overwrite:
        raise OutputExistsError(f"{dst} already exists; pass --overwrite to replace it")


def replace_folder(tmp: Path, dst: Path) -> None:
    """Put the finished folder `tmp` at `dst` (a sibling of it), replacing an existing `dst` only once `tmp` is whole:
    the old one is renamed aside first and deleted last, so a failure never leaves neither."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        dst.rename(old / dst.name)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)
