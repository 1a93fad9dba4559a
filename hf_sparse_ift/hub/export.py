"""Plain transformers GPT-2 folders from Sparse Wide checkpoints, and back.

    hf-sparse-ift export      outputs/run/checkpoint-600/hf outputs/run/gpt2        # any layout -> GPT2LMHeadModel
    hf-sparse-ift import-gpt2 path/to/gpt2-folder outputs/sw-dense                   # GPT-2 -> dense Sparse Wide

A Sparse Wide model is GPT-2's architecture at wider sizes with zeros in its sparse layers, so `export_gpt2` writes
it as a dense ``GPT2LMHeadModel`` of the widened sizes (the zeros stored as zeros) that every GPT-2 tool runs: the
weights, the tokenizer with the model's own context length as ``model_max_length``, and a model card naming the
checkpoint it came from. The checkpoint may be in any layout: masked (plain or ``bitmask-values-v1``), condensed
(``condensed-v1``) or block-sparse. Nothing is padded: a head size that is not a multiple of 8 is written as it is.

Both commands check everything before loading a model, write to a temporary folder next to the output and rename it
into place (complete or absent), replace an existing output only with ``overwrite``, and never write into, over or
around their input. Remote code needs none of this: it lives outside the model folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..errors import InputNotFoundError, NotWritableError, OutputExistsError, UsageError

SPARSE_WIDE_MODEL_TYPE = "sparse_wide_gpt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")

__all__ = ["checkpoint_layout", "export_gpt2", "import_gpt2", "save_tokenizer"]


def _read_config(folder: Path, expected: str, what: str) -> dict:
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise InputNotFoundError(f"{folder} is not a folder; expected a save_pretrained folder of {what}")
    if not config_file.is_file():
        raise UsageError(f"{folder} is not a save_pretrained folder: it has no config.json (expected {what})")
    config = json.loads(config_file.read_text())
    if config.get("model_type") != expected:
        raise UsageError(
            f"{folder} is not {what}: its config.json says model_type {config.get('model_type')!r}, "
            f"expected {expected!r}"
        )
    return config


def checkpoint_layout(config: dict) -> str:
    """How a Sparse Wide checkpoint stores its sparse layers: ``dense`` (sparsity 0), ``block <R>x<C>``,
    ``condensed-v1``, ``bitmask-values-v1`` or ``plain`` (dense weights and bool masks)."""
    if not config.get("sparsity"):
        return "dense"
    block = config.get("sparsity_block", 1)
    rows, cols = (block, block) if isinstance(block, int) else block
    if (rows, cols) != (1, 1):
        return f"block {rows}x{cols}"
    fmt = config.get("sparse_format")
    return fmt["format"] if isinstance(fmt, dict) and fmt.get("format") else "plain"


def _check_output(src: Path, dst: Path, overwrite: bool) -> None:
    source, target = src.resolve(), dst.resolve()
    if target == source:
        raise UsageError(f"output {dst} is the input folder; write to another folder")
    if source in target.parents:
        raise UsageError(f"output {dst} is inside the input folder {src}; write to a folder outside it")
    if target in source.parents:
        raise UsageError(f"output {dst} contains the input folder {src}; replacing it would delete the input")
    if dst.exists() and not overwrite:
        raise OutputExistsError(f"{dst} already exists; pass --overwrite to replace it")


def _temporary_folder(dst: Path) -> Path:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    except OSError as err:
        raise NotWritableError(
            f"output {str(dst)!r} is not writable ({err.strerror or err}); choose a folder this process can create "
            "and write"
        ) from None


def _move_into_place(tmp: Path, dst: Path) -> None:
    from ..sparsity.checkpoint_layouts import replace_folder  # imports torch: only once an export has run

    replace_folder(tmp, dst)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()


def save_tokenizer(tokenizer, folder: str | Path, model_max_length: int) -> None:
    """``tokenizer.save_pretrained(folder)`` with ``model_max_length`` set to the model's context length (so that
    ``tokenizer(text, truncation=True)`` never gives more tokens than the model has positions); the object passed
    in is left as it was."""
    before = tokenizer.model_max_length
    tokenizer.model_max_length = model_max_length
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.model_max_length = before


def _copy_tokenizer(src: Path, dst: Path, n_positions: int) -> bool:
    if not _has_tokenizer(src):
        return False
    from transformers import AutoTokenizer

    save_tokenizer(AutoTokenizer.from_pretrained(src), dst, n_positions)
    return True


def _export_card(src: Path, config: dict, gpt2_config, sha256: str | None, tokenizer: bool) -> str:
    from .. import __version__

    width = gpt2_config.n_embd
    head = width // gpt2_config.n_head
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [gpt2, sparse-wide-gpt, sparse-ift]",
        "---",
        "",
        "# GPT-2 export of a Sparse Wide GPT model",
        "",
        f"A plain `GPT2LMHeadModel` written by `hf-sparse-ift export` (hf-sparse-ift {__version__}). It computes the "
        "same logits as the Sparse Wide model it came from; the inactive weights of its sparse layers are stored "
        "as zeros, so it runs at dense cost in any GPT-2 runtime.",
        "",
        "| | |",
        "|---|---|",
        f"| source | `{src}` |",
        f"| source tensors sha256 | `{sha256}` |",
        f"| source layout | {checkpoint_layout(config)} |",
        f"| sparsity (of the sparse layers, nominal) | {config.get('sparsity', 0)} |",
        f"| layer sparsity | {config.get('layer_sparsity', 0)} |",
        f"| sparse layers | {', '.join(config.get('sparse_layers') or [])} |",
        f"| dense sizes (d_model / d_ff) | {config.get('dense_hidden_size')} / {config.get('dense_intermediate_size')} |",
        f"| widened sizes (n_embd / n_inner) | {width} / {gpt2_config.n_inner} |",
        f"| layers, heads, head size | {gpt2_config.n_layer}, {gpt2_config.n_head}, {head} |",
        f"| context (n_positions, tokenizer model_max_length) | {gpt2_config.n_positions} |",
        f"| tokenizer | {'copied from the source' if tokenizer else 'none: the source folder has none'} |",
        "",
        "Nothing is padded: the head size is the Sparse Wide model's own"
        + (" (not a multiple of 8)." if head % 8 else "."),
        "",
        "```python",
        "from transformers import GPT2LMHeadModel",
        "",
        'model = GPT2LMHeadModel.from_pretrained("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)


def export_gpt2(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write the Sparse Wide checkpoint folder `checkpoint` (any layout) as a plain transformers GPT-2 folder at
    `out`: ``config.json`` (``model_type: gpt2``, the widened sizes), ``model.safetensors``, the tokenizer (when the
    checkpoint has one) with ``model_max_length`` = ``n_positions``, and a ``README.md`` model card naming the source
    (path, tensors sha256, sparsity, layout). Returns a summary of what was written."""
    src, dst = Path(checkpoint), Path(out)
    config = _read_config(src, SPARSE_WIDE_MODEL_TYPE, "a Sparse Wide model")
    _check_output(src, dst, overwrite)
    tmp = _temporary_folder(dst)
    try:
        from ..models.sparse_wide_gpt import SparseWideGPTForCausalLM
        from ..models.sparse_wide_gpt.convert_gpt2 import sparse_wide_to_gpt2
        from .identity import tensors_sha256

        model = SparseWideGPTForCausalLM.from_pretrained(src, dtype="auto").eval()
        gpt2 = sparse_wide_to_gpt2(model)
        gpt2.save_pretrained(tmp)
        tokenizer = _copy_tokenizer(src, tmp, gpt2.config.n_positions)
        sha256 = tensors_sha256(src)
        (tmp / "README.md").write_text(_export_card(src.resolve(), config, gpt2.config, sha256, tokenizer))
        _move_into_place(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {
        "input": str(src),
        "input_layout": checkpoint_layout(config),
        "input_tensors_sha256": sha256,
        "output": str(dst),
        "output_model_type": "gpt2",
        "n_embd": gpt2.config.n_embd,
        "n_inner": gpt2.config.n_inner,
        "n_positions": gpt2.config.n_positions,
        "tokenizer": tokenizer,
    }


def import_gpt2(gpt2_folder: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write the transformers GPT-2 folder `gpt2_folder` as a dense (sparsity 0) Sparse Wide checkpoint at `out`
    with the same logits (`convert_gpt2.gpt2_to_sparse_wide`), its tokenizer (``model_max_length`` =
    ``n_positions``) when it has one. Returns a summary of what was written."""
    src, dst = Path(gpt2_folder), Path(out)
    _read_config(src, "gpt2", "a GPT-2 model")
    _check_output(src, dst, overwrite)
    tmp = _temporary_folder(dst)
    try:
        from ..models.sparse_wide_gpt.convert_gpt2 import gpt2_to_sparse_wide

        model = gpt2_to_sparse_wide(src)
        model.save_pretrained(tmp)
        tokenizer = _copy_tokenizer(src, tmp, model.config.n_positions)
        _move_into_place(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {
        "input": str(src),
        "output": str(dst),
        "output_model_type": SPARSE_WIDE_MODEL_TYPE,
        "sparsity": model.config.sparsity,
        "hidden_size": model.config.hidden_size,
        "n_positions": model.config.n_positions,
        "tokenizer": tokenizer,
    }
