"""Loading and saving a Sparse Wide GPT: the one override of `from_pretrained`, `save_pretrained`, `push_to_hub` and
`condense` (`SparseCheckpointMixin`), and every load guard.

A load either gives the model that was saved or stops with a message saying why:

* the checkpoint's sparse layout must be decoded (`check_sparse_load`): compressed or condensed tensors left over, or
  sparse layers left without their tensors, would return randomly initialised layers;
* masks: a masked layer whose weights came without their mask is refused (``rebuild_masks="from_weights"`` reads it
  off the weights instead), and weights non-zero at inactive positions are zeroed with a warning (``strict_masks``
  refuses them); a block layer's index must be a valid BSR index of its active blocks;
* tensor parallelism must split the attention heads whole.

The layouts themselves are in `sparse_safetensors.py` (compressed) and `condensed_linear.py` (condensed).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from transformers.utils import logging

from .condensed_linear import CONDENSED_FORMAT, CondensedLinear, condense_model, sparse_format_of_condensed
from .errors import UsageError
from .iso_flop import num_inactive
from .layer_utils import full_tensor, is_dtensor, is_masked_layer
from .sparse_layers import BlockSparseLinear, SparseLinear
from .sparse_safetensors import (
    _LAYOUT_TENSORS,
    BITMASK_FORMAT,
    KNOWN_FORMATS,
    PLAIN,
    _recording_conversion_errors,
    compress_state_dict,
    decompress_state_dict,
    format_config,
    register_sparse_layouts,
)

logger = logging.get_logger(__name__)

_REBUILD_CHOICES = (None, "from_weights")


def _loaded(tensor) -> bool:
    """Whether `from_pretrained` filled this parameter or buffer from the checkpoint."""
    return bool(getattr(tensor, "_is_hf_initialized", False))


def init_mask(module: SparseLinear) -> None:
    """The mask of a masked layer after `from_pretrained` (or at init): loaded, else read off loaded weights (which
    `from_pretrained` refuses unless asked, see `_check_rebuilt_masks`), else drawn from its seed once."""
    weight_loaded = _loaded(module.weight)
    if _loaded(module.weight_mask):
        module._mask_source = "checkpoint"
    elif weight_loaded:
        # Trained weights without their mask: a random mask would zero trained weights.
        module.weight_mask.copy_(full_tensor(module.weight).ne(0))
        module._mask_source = "weights"
    elif module._mask_source != "seed":
        module.weight_mask.copy_(module.random_mask())
        module._mask_source = "seed"
    if not weight_loaded:  # +0.0 at inactive positions (a product would leave -0.0 where the draw was negative)
        module.weight.masked_fill_(~module.weight_mask, 0.0)


def init_block_index(module: BlockSparseLinear) -> None:
    """The block index of a block layer after `from_pretrained` (or at init): loaded, else drawn from its seed once;
    active blocks loaded without their index are refused."""
    if _loaded(module.block_col_indices) and _loaded(module.block_crow_indices):
        module._mask_source = "checkpoint"
    elif _loaded(module.weight_blocks):
        raise UsageError(
            "the checkpoint has the active blocks (weight_blocks) of a block-sparse layer but not its block index "
            "(block_crow_indices, block_col_indices): which blocks they are cannot be recovered"
        )
    elif module._mask_source != "seed":
        module.set_block_mask(module.random_block_mask())
        module._mask_source = "seed"


def check_sparse_load(model, loading_info: dict) -> None:
    """The guard: refuse a load that left a checkpoint's sparse layout undecoded or a sparse layer without its tensors.

    Such a model would compute with freshly initialised sparse layers; transformers only warns about keys."""
    fmt = getattr(model.config, "sparse_format", None)
    name = fmt.get("format") if isinstance(fmt, dict) else None
    if name is not None and name not in KNOWN_FORMATS:
        raise UsageError(
            f"checkpoint sparse_format {name!r} is not supported by this code; supported: {list(KNOWN_FORMATS)} "
            f"(and the plain layout)"
        )
    unexpected = sorted(k for k in loading_info["unexpected_keys"] if k.endswith(_LAYOUT_TENSORS))
    if unexpected:
        raise UsageError(
            f"the checkpoint's sparse tensors {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''} were not decoded "
            f"into the model: the checkpoint conversion registered for model type {model.config.model_type!r} "
            f"(transformers.conversion_mapping) did not apply, or this model's config does not match the checkpoint. "
            f"Refusing to return a model whose sparse layers would be randomly initialised."
        )
    sparse_names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (CondensedLinear, BlockSparseLinear)) or is_masked_layer(m)
    ]
    for entry in loading_info.get("mismatched_keys") or []:
        key = entry[0] if isinstance(entry, (tuple, list)) else entry
        layer_name = next((name for name in sparse_names if key.startswith(f"{name}.")), None)
        if layer_name is not None:  # ignore_mismatched_sizes=True re-initialised it: values random, index from the file
            shapes = f" ({entry[1]} in the checkpoint, {entry[2]} in the model)" if len(entry) == 3 else ""
            raise UsageError(
                f"the checkpoint's {key}{shapes} does not fit the sparse layer {layer_name!r} that its config.json "
                "builds: ignore_mismatched_sizes cannot apply to a sparse layer (its tensors would be random while "
                "the rest of its layout comes from the file); load these weights with the config they were saved with"
            )
    missing = set(loading_info["missing_keys"])
    for layer_name, layer in model.named_modules():
        if isinstance(layer, CondensedLinear):
            absent = [f"{layer_name}.{key}" for key in layer.state_dict() if f"{layer_name}.{key}" in missing]
        elif is_masked_layer(layer):  # a weight without its mask is `rebuild_masks`' case, not this one
            required = [f"{layer_name}.weight", f"{layer_name}.weight_mask"]
            absent = required if all(key in missing for key in required) else []
        else:
            continue
        if absent:
            raise UsageError(
                f"the checkpoint has no tensors for the sparse layer {layer_name!r} (missing {absent[:3]}): it would be "
                f"left randomly initialised. Is the checkpoint of another model, or in a layout this code cannot read?"
            )


def _local_checkpoint_state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{folder} has no .safetensors files to load")
    state_dict = {}
    for file in files:
        state_dict.update(load_file(file))
    return decompress_state_dict(state_dict)


@contextlib.contextmanager
def _config_format(config, value):
    previous = getattr(config, "sparse_format", None)
    config.sparse_format = value
    try:
        yield
    finally:
        config.sparse_format = previous


def _model_format(model) -> str | None:
    """What the model holds: condensed layers, masked sparse layers, or neither."""
    kinds = {
        CONDENSED_FORMAT if isinstance(m, CondensedLinear) else BITMASK_FORMAT
        for m in model.modules()
        if isinstance(m, CondensedLinear) or is_masked_layer(m)
    }
    if len(kinds) > 1:
        raise UsageError("the model mixes condensed and masked sparse layers; condense all of them or none")
    return kinds.pop() if kinds else None


class SparseCheckpointMixin:
    """`from_pretrained` / `save_pretrained` / `push_to_hub` / `condense` of a Sparse Wide GPT: the compressed and
    condensed layouts, and the load guards. Mixed in before `PreTrainedModel`; the only override of these methods."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *model_args,
        rebuild_masks: str | None = None,
        strict_masks: bool = False,
        **kwargs,
    ):
        r"""`PreTrainedModel.from_pretrained`, reading the compressed and condensed layouts, with the load guards and
        two options for the sparsity masks.

        Args:
            rebuild_masks (`str`, *optional*):
                A checkpoint whose weights come without their ``weight_mask`` tensors is an error (drawing fresh
                random masks would zero trained weights). ``"from_weights"`` rebuilds each missing mask from the
                non-zero pattern of its weights instead, with a warning: active weights that happen to be exactly
                zero (e.g. regrown at zero and not trained since) become inactive, which cannot be undone.
            strict_masks (`bool`, *optional*, defaults to `False`):
                Weights that are non-zero where their mask is inactive break the model's invariant. By default they
                are set to zero with a warning that counts them; ``strict_masks=True`` raises instead.
        """
        if rebuild_masks not in _REBUILD_CHOICES:
            raise UsageError(f"rebuild_masks={rebuild_masks!r} is invalid: expected one of {list(_REBUILD_CHOICES)}")
        if not isinstance(strict_masks, bool):
            raise UsageError(f"strict_masks={strict_masks!r} is invalid: expected True or False")
        register_sparse_layouts(cls.config_class.model_type)
        output_loading_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("tp_plan") is not None or kwargs.get("device_mesh") is not None:
            pretrained_model_name_or_path = cls._decode_for_tensor_parallel(pretrained_model_name_or_path, kwargs)
        with _recording_conversion_errors() as errors:
            try:
                model, loading_info = super().from_pretrained(
                    pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
                )
            except RuntimeError as err:
                if errors:  # our conversion failed: say how, not only that it did
                    raise UsageError(errors[0]) from err
                if "ignore_mismatched_sizes" in str(err):  # transformers' report of the keys is logged above
                    raise UsageError(
                        f"{pretrained_model_name_or_path}: tensors of the checkpoint do not have the shapes its "
                        "config.json gives (the report above lists them): the weights and the config do not belong "
                        "together. ignore_mismatched_sizes=True would re-initialise them at random, and is refused for "
                        "the tensors of sparse layers"
                    ) from None
                raise
        check_sparse_load(model, loading_info)
        model._check_tensor_parallel()
        model._check_loaded_masks(rebuild_masks=rebuild_masks, strict_masks=strict_masks)
        for module in model.modules():
            if isinstance(module, BlockSparseLinear):
                module.check_block_index()
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _decode_for_tensor_parallel(cls, path, kwargs: dict):
        """Tensor-parallel loading slices each checkpoint tensor like its target weight, which packed mask bits cannot
        be: a compressed checkpoint is decoded here and handed over as ``state_dict`` (plain ones load as usual)."""
        config = kwargs.get("config")
        if config is None or isinstance(config, (str, os.PathLike)):
            config = cls.config_class.from_pretrained(config or path)
        fmt = config.sparse_format.get("format") if isinstance(config.sparse_format, dict) else None
        if fmt == CONDENSED_FORMAT:
            raise UsageError(
                f"{path} is condensed ({CONDENSED_FORMAT}), for CPU inference: tensor parallelism cannot split it. "
                "Load the masked checkpoint it was made from with tp_plan instead."
            )
        if fmt != BITMASK_FORMAT:
            return path
        if not Path(path).is_dir():
            raise UsageError(
                f"tensor-parallel loading of the compressed layout ({BITMASK_FORMAT}) reads a local folder: download "
                f"{path} first (huggingface_hub.snapshot_download) or decompress it (hf-sparse-ift decompress)"
            )
        kwargs["config"] = config
        kwargs["state_dict"] = _local_checkpoint_state_dict(Path(path))
        return None

    def save_pretrained(
        self,
        save_directory,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        *args,
        sparse_format: str | None = "auto",
        **kwargs,
    ):
        """As `PreTrainedModel.save_pretrained`, plus ``sparse_format``:

        * ``"auto"`` (default): ``bitmask-values-v1`` for a model with masked sparse layers, the condensed layout for a
          condensed model, the plain layout for a dense one;
        * ``"bitmask-values-v1"``: the compressed layout (a model without sparse layers is saved plain);
        * ``"plain"`` or ``None``: dense weights plus bool masks, as written before the compressed layout existed.
        """
        held = _model_format(self)
        wanted = PLAIN if sparse_format is None else sparse_format
        valid = ("auto", BITMASK_FORMAT, PLAIN)
        if wanted not in valid:
            raise UsageError(f"sparse_format={sparse_format!r} is invalid: expected one of {list(valid)} or None")
        if wanted != "auto" and any(isinstance(m, BlockSparseLinear) for m in self.modules()):
            raise UsageError(  # as `compress` refuses a block checkpoint: neither layout applies to its layers
                f"sparse_format={sparse_format!r} is invalid for a block-sparse model: it stores only its active blocks "
                "and their index, in its own layout; save it with sparse_format='auto', or convert it to the masked "
                "layout first (hf_sparse_ift.sparsity.blocks.to_masked_model)"
            )
        if held == CONDENSED_FORMAT and wanted != "auto":
            raise UsageError(
                f"sparse_format={sparse_format!r} is invalid for a condensed model: it holds no masks "
                f"or dense weights; save it with sparse_format='auto' ({CONDENSED_FORMAT})"
            )
        # The loading conversion has no reverse: transformers must save the state dict it is given as it is.
        kwargs.setdefault("save_original_format", False)
        if held == CONDENSED_FORMAT:
            layout = sparse_format_of_condensed(self)
        elif held is None or wanted == PLAIN or kwargs.get("distributed_checkpoint"):
            layout = None
        else:
            layout = format_config()
            state_dict = compress_state_dict(self.state_dict() if state_dict is None else state_dict)
        with _config_format(self.config, layout):
            return super().save_pretrained(save_directory, is_main_process, state_dict, *args, **kwargs)

    def push_to_hub(self, *args, sparse_format: str | None = "auto", **kwargs):
        """As `PreTrainedModel.push_to_hub`; ``sparse_format`` as in `save_pretrained` (``"plain"`` keeps the plain layout)."""
        save = self.save_pretrained

        def save_with_format(*a, **k):
            k.setdefault("sparse_format", sparse_format)
            return save(*a, **k)

        self.save_pretrained = save_with_format
        try:
            return super().push_to_hub(*args, **kwargs)
        finally:
            del self.save_pretrained

    def condense(self, representation: str = "auto"):
        """Replace every masked sparse linear by a `CondensedLinear` (in place; see `condensed_linear.py`). Returns the
        model. A block-sparse model is refused: it already stores and computes only its active blocks."""
        if self.config.uses_blocks:
            raise UsageError(
                f"this model's sparse layers are block-sparse (sparsity_block={self.config.sparsity_block!r}): they "
                f"already store and compute only their active blocks, and condensing applies to masked layers. "
                f"Convert to the masked layout first (hf_sparse_ift.sparsity.blocks.to_masked_model) to condense."
            )
        return condense_model(self, representation)

    def _check_tensor_parallel(self) -> None:
        """Heads are split between ranks whole: refuse a TP size that does not divide n_head (else wrong shapes)."""
        for module in self.modules():
            if hasattr(module, "q_proj") and is_dtensor(getattr(module.q_proj, "weight", None)):
                tp_size = module.q_proj.weight.device_mesh.size()
                if self.config.n_head % tp_size:
                    raise UsageError(
                        f"Tensor parallelism over {tp_size} ranks cannot split n_head={self.config.n_head} attention "
                        f"heads evenly: use a TP size that divides n_head"
                    )
                return

    @torch.no_grad()
    def _check_loaded_masks(self, rebuild_masks: str | None = None, strict_masks: bool = False) -> None:
        """After loading: refuse (or rebuild) missing masks, shard masks like their weights, and repair (or refuse)
        weights that are non-zero at inactive positions."""
        layers = {name: m for name, m in self.named_modules() if isinstance(m, SparseLinear)}
        _check_rebuilt_masks(layers, rebuild_masks)
        for layer in layers.values():
            if layer._mask_source is None:
                layer._mask_source = "checkpoint"
            layer.shard_mask_like_weight()
        _zero_inactive_weights(layers, strict_masks)


def _check_rebuilt_masks(layers: dict[str, SparseLinear], rebuild_masks: str | None) -> None:
    """Layers whose weights loaded without their masks got masks read off their weights (`_init_mask`): an error
    unless ``rebuild_masks="from_weights"`` asked for it, then a warning that counts what that cost."""
    rebuilt = [name for name, m in layers.items() if m._mask_source == "weights"]
    if not rebuilt:
        return
    if rebuild_masks != "from_weights":
        raise UsageError(
            f"The checkpoint has the weights of {len(rebuilt)} sparse layer(s) but not their masks "
            f"({', '.join(n + '.weight_mask' for n in rebuilt[:3])}{', ...' if len(rebuilt) > 3 else ''}). "
            f"Refusing to draw new random masks over trained weights. Load a checkpoint saved with its masks, or "
            f"pass rebuild_masks='from_weights' to rebuild each mask from the non-zero pattern of its weights."
        )
    active = sum(int(layers[n].weight_mask.sum()) for n in rebuilt)
    expected = sum(
        layers[n].weight_mask.numel() - num_inactive(layers[n].weight_mask.numel(), layers[n].sparsity) for n in rebuilt
    )
    logger.warning(
        f"Rebuilt the masks of {len(rebuilt)} sparse layer(s) from the non-zero pattern of their weights "
        f"(rebuild_masks='from_weights'): {active} active weights, where the configured sparsity gives "
        f"{expected}. Active weights that were exactly zero in the checkpoint (e.g. regrown at zero) are now "
        f"inactive; that cannot be recovered from the weights."
    )


def _zero_inactive_weights(layers: dict[str, SparseLinear], strict_masks: bool) -> None:
    """Weights that are non-zero where their mask is inactive break the invariant: zero them with a warning that counts
    them, or refuse (``strict_masks``, or offloaded layers, which cannot be written)."""
    counts = {}
    offloaded = []
    for name, layer in layers.items():
        weight, mask, on_device = layer.weight_and_mask()
        if weight is None:
            continue
        bad = int(full_tensor((weight.ne(0) & ~mask.to(weight.device)).sum()))
        if bad:
            counts[name] = bad
            if not on_device:
                offloaded.append(name)
    if not counts:
        return
    total = sum(counts.values())
    detail = ", ".join(f"{name}: {n}" for name, n in counts.items())
    if strict_masks:
        raise UsageError(
            f"strict_masks=True: {total} weights are non-zero at inactive (masked) positions ({detail}); "
            f"a Sparse Wide GPT keeps them exactly zero. Load without strict_masks to zero them."
        )
    if offloaded:
        raise UsageError(
            f"{total} weights are non-zero at inactive (masked) positions ({detail}), and the layers "
            f"{offloaded} are offloaded, where they cannot be repaired. Load without offloading (no device_map, "
            f"or one that fits in memory) to zero them, then save the repaired model."
        )
    for name in counts:
        layers[name].weight.masked_fill_(~layers[name].weight_mask, 0.0)
    logger.warning(
        f"Zeroed {total} weights that were non-zero at inactive (masked) positions ({detail}): a Sparse Wide GPT "
        f"keeps inactive weights exactly zero. Pass strict_masks=True to refuse such checkpoints instead."
    )


__all__ = ["SparseCheckpointMixin", "check_sparse_load", "init_block_index", "init_mask"]
