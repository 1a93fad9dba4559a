"""Lossless compressed safetensors checkpoints for sparse linears: packed mask bits plus the active values.

Layout ``bitmask-values-v1``. Every sparse linear ``P`` (a module with ``P.weight`` and a bool ``P.weight_mask`` of
the same shape) is stored as three tensors instead of two:

* ``P.weight_bitmask``: uint8 ``[ceil(out·in / 8)]``, the mask flattened row-major, 8 positions per byte, least
  significant bit first (`pack_bits`); padding bits are 0.
* ``P.weight_active_values``: ``[number of set bits]`` in the weight's dtype, the weights at the active positions in
  row-major order, copied bit for bit (an active weight that is exactly 0, as DST regrows them, stays an active 0).
* ``P.weight_shape``: int64 ``[2]``, ``(out, in)``.

Everything else (biases, embeddings, norms) is stored as usual. The mask is *stored*, never inferred from zeros.
``config.json`` carries ``"sparse_format": {"format": "bitmask-values-v1", ...}``. Loading rebuilds ``weight``
(inactive positions +0.0) and ``weight_mask`` exactly, with numpy (no compiler, no native code); plain checkpoints
(``P.weight`` + ``P.weight_mask``) load as before.

How it plugs into transformers, through public extension points only:

* Loading: `register_sparse_layouts` registers a checkpoint conversion (``transformers.conversion_mapping``) whose
  `WeightConverter` turns each layer's three tensors into ``weight`` and ``weight_mask`` (`DecodeSparseLayer`), so
  sharded checkpoints, ``device_map`` / disk offload and ``trust_remote_code`` (this file is copied next to the model
  code) load through transformers' own loader. Tensor-parallel loading slices every checkpoint tensor like its target
  weight, which packed bits cannot be: `SparseCheckpointMixin.from_pretrained` decodes a local compressed checkpoint
  first and passes it as ``state_dict``.
* Saving: `SparseCheckpointMixin.save_pretrained` hands transformers the compressed tensors as ``state_dict``.
* The guard (`check_sparse_load`): compressed or condensed tensors left unexpected, or sparse layers left without
  their tensors, make ``from_pretrained`` fail, so a change in transformers that skips the conversion can never
  return a randomly initialised model.

Condensed models (see `condensed_linear.py`) are saved and loaded by name: their config lists the condensed layers' sizes.
No pickle: only safetensors files and JSON.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter

from .condensed_linear import CONDENSED_FORMAT
from .errors import UsageError
from .layer_utils import full_tensor, is_masked_layer

BITMASK_FORMAT = "bitmask-values-v1"
PLAIN = "plain"
MASK_SUFFIX = ".weight_bitmask"
VALUES_SUFFIX = ".weight_active_values"
SHAPE_SUFFIX = ".weight_shape"
KNOWN_FORMATS = (BITMASK_FORMAT, CONDENSED_FORMAT)
# Names of tensors that only a decoded (compressed) or condensed layer explains: left over after loading, they mean
# the layout was not understood.
_LAYOUT_TENSORS = (MASK_SUFFIX, VALUES_SUFFIX, SHAPE_SUFFIX, ".values", ".col_indices", ".row_ptr", ".row_ids")

__all__ = [
    "BITMASK_FORMAT",
    "PLAIN",
    "DecodeSparseLayer",
    "compress_state_dict",
    "compress_weight",
    "decompress_state_dict",
    "decompress_weight",
    "format_config",
    "is_compressed_state_dict",
    "pack_bits",
    "register_sparse_layouts",
]

# Integer dtypes of each width: values are moved between torch and numpy as raw bits (numpy has no bfloat16).
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Eight bytes b0..b7 (each 0 or 1, read as one little-endian int64) times this constant hold b0 + 2·b1 + ... + 128·b7
# in their top byte: the partial sums below it stay under 256, so nothing carries into it.
_GATHER_BITS = 0x0102040810204080


def format_config() -> dict:
    """What ``config.json`` records about the compressed layout (``config.sparse_format``)."""
    return {
        "format": BITMASK_FORMAT,
        "mask": "uint8 <layer>.weight_bitmask: row-major, least significant bit first",
        "values": "<layer>.weight_active_values: active weights in row-major order, weight dtype",
        "shape": "int64 <layer>.weight_shape: (out_features, in_features)",
    }


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 positions per byte in row-major order, least significant bit first (on its device).

    The one bit packer: the compressed layout's mask bits and the DST engine's mask snapshots."""
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    words = flat.contiguous().view(torch.uint8).view(torch.int64)
    return ((words * _GATHER_BITS) >> 56).to(torch.uint8)  # the top byte; wrapping products keep it exact


def _as_bits(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a numpy integer array of the same element width (no copy)."""
    t = t.detach().to("cpu").contiguous()
    return t.view(_INT_OF_WIDTH[t.element_size()]).numpy()


def compress_weight(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bits, active values, shape) of one sparse weight. Values are copied bit for bit, active zeros included."""
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise UsageError(
            f"weight {tuple(weight.shape)} needs a bool mask of the same shape, got {mask.dtype} {tuple(mask.shape)}"
        )
    mask = mask.detach().to("cpu")
    active = _as_bits(mask).reshape(-1).view(np.bool_)  # a bool condition: np.compress converts any other dtype first
    values = torch.from_numpy(np.compress(active, _as_bits(weight).reshape(-1)))
    return pack_bits(mask), values.view(weight.dtype), torch.tensor(list(weight.shape), dtype=torch.int64)


def decompress_weight(
    bits: torch.Tensor, values: torch.Tensor, shape, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) from `compress_weight`'s output. Inactive positions are +0.0."""
    shape = tuple(int(s) for s in (shape.tolist() if isinstance(shape, torch.Tensor) else shape))
    if len(shape) != 2 or min(shape) < 1:
        raise UsageError(f"{name}: stored shape {shape} is not a 2-D weight shape")
    numel = shape[0] * shape[1]
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
        raise UsageError(
            f"{name}: mask bits of shape {tuple(bits.shape)} and dtype {bits.dtype} do not fit a weight "
            f"of shape {shape}: expected uint8 [{(numel + 7) // 8}]"
        )
    if values.dim() != 1:
        raise UsageError(f"{name}: stored values must be 1-D, got shape {tuple(values.shape)}")
    packed, raw = _as_bits(bits), _as_bits(values)
    if numel % 8 and packed[-1] >> (numel % 8):
        raise UsageError(f"{name}: mask bits for shape {shape} have non-zero padding bits in the last byte")
    mask = np.unpackbits(packed, count=numel, bitorder="little").view(np.bool_)
    active = np.flatnonzero(mask)
    if raw.size != active.size:
        raise UsageError(f"{name}: {raw.size} stored values for a mask with {active.size} active positions")
    # Raw bits are copied, never computed with, so every value (the signs of zeros included) is kept. Positions, then
    # one scatter: measured 2.5x faster than boolean-mask assignment and 4x faster than torch's masked_scatter_.
    dense = np.zeros(numel, dtype=raw.dtype)
    dense[active] = raw
    return torch.from_numpy(dense).view(values.dtype).view(shape), torch.from_numpy(mask).view(shape)


def _sparse_pairs(state_dict) -> list[str]:
    """Prefixes P with ``P.weight`` and a bool ``P.weight_mask`` of the same shape (the plain sparse layout)."""
    prefixes = []
    for key, mask in state_dict.items():
        if key.endswith(".weight_mask") and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            prefix = key[: -len(".weight_mask")]
            weight = state_dict.get(prefix + ".weight")
            if isinstance(weight, torch.Tensor) and weight.shape == mask.shape:
                prefixes.append(prefix)
    return prefixes


def compress_state_dict(state_dict: dict) -> dict:
    """Plain state dict -> ``bitmask-values-v1`` state dict (other tensors are passed through, in order)."""
    prefixes = set(_sparse_pairs(state_dict))
    out = {}
    for key, tensor in state_dict.items():
        prefix = key.rpartition(".")[0]
        if prefix not in prefixes or not key.endswith((".weight", ".weight_mask")):
            out[key] = tensor
        elif key.endswith(".weight"):
            mask = full_tensor(state_dict[prefix + ".weight_mask"])
            bits, values, shape = compress_weight(full_tensor(tensor), mask)
            out[prefix + MASK_SUFFIX] = bits
            out[prefix + VALUES_SUFFIX] = values
            out[prefix + SHAPE_SUFFIX] = shape
    return out


def _compressed_prefixes(keys) -> list[str]:
    keys = set(keys)
    # `.weight_shape` alone also belongs to condensed layers (condensed_linear.py): a bitmask or values key makes a layer ours.
    prefixes = {k[: -len(s)] for k in keys for s in (MASK_SUFFIX, VALUES_SUFFIX) if k.endswith(s)}
    for prefix in prefixes:
        _check_complete(prefix, [s for s in (MASK_SUFFIX, VALUES_SUFFIX, SHAPE_SUFFIX) if prefix + s not in keys])
    return sorted(prefixes)


def _check_complete(prefix: str, missing_suffixes: list[str]) -> None:
    if missing_suffixes:
        raise UsageError(
            f"compressed layer {prefix!r} is incomplete: missing {[prefix + s for s in missing_suffixes]} "
            f"({BITMASK_FORMAT} stores {MASK_SUFFIX}, {VALUES_SUFFIX} and {SHAPE_SUFFIX} for each sparse layer)"
        )


def is_compressed_state_dict(keys) -> bool:
    return any(k.endswith((MASK_SUFFIX, VALUES_SUFFIX)) for k in keys)


def decompress_state_dict(state_dict: dict) -> dict:
    """``bitmask-values-v1`` state dict (tensors or safetensors slices) -> plain state dict (``P.weight`` +
    ``P.weight_mask``, in place of each compressed layer's tensors); other entries are passed through."""
    prefixes = set(_compressed_prefixes(state_dict))
    out = {}
    for key, entry in state_dict.items():
        prefix = next((key[: -len(s)] for s in (MASK_SUFFIX, VALUES_SUFFIX, SHAPE_SUFFIX) if key.endswith(s)), None)
        if prefix not in prefixes:
            out[key] = entry[...]
        elif key.endswith(MASK_SUFFIX):
            values, shape = state_dict[prefix + VALUES_SUFFIX][...], state_dict[prefix + SHAPE_SUFFIX][...]
            out[prefix + ".weight"], out[prefix + ".weight_mask"] = decompress_weight(entry[...], values, shape, prefix)
    return out


# ----------------------------------------------------------------------------------------------
# Loading: a checkpoint conversion registered with transformers
# ----------------------------------------------------------------------------------------------
_SOURCES = [MASK_SUFFIX[1:], VALUES_SUFFIX[1:], SHAPE_SUFFIX[1:]]
_TARGETS = ["weight", "weight_mask"]
# Errors of the conversion in this thread's current `from_pretrained`: transformers reports a failed conversion in its
# loading report and raises a generic error; ours names the layer and the problem.
_conversion_errors = threading.local()


class DecodeSparseLayer(ConversionOps):
    """``weight_bitmask`` + ``weight_active_values`` + ``weight_shape`` of one layer -> ``weight`` + ``weight_mask``.

    transformers has already cast every source tensor to the target weight's dtype (it does so for all tensors of a
    conversion): mask bytes 0..255 survive that exactly in every floating dtype and are turned back into uint8, the
    values are what a plain checkpoint's weights would have become, and the stored shape is checked against the
    model's (it need not be exact in bf16 and is not used to decode)."""

    supports_many_to_many = True

    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, model=None, **kwargs):
        prefix = full_layer_name[: -len(".weight")]
        try:
            return dict(zip(_TARGETS, self._decode(prefix, input_dict, model)))
        except ValueError as err:
            recorded = getattr(_conversion_errors, "messages", None)
            if recorded is not None:
                recorded.append(str(err))
            raise

    @staticmethod
    def _decode(prefix: str, input_dict: dict, model) -> tuple[torch.Tensor, torch.Tensor]:
        _check_complete(prefix, ["." + s for s in _SOURCES if not input_dict.get(s)])
        layer = model.get_submodule(prefix) if model is not None else None
        if layer is not None and not is_masked_layer(layer):
            raise UsageError(
                f"the checkpoint stores {prefix!r} as a compressed sparse layer, but this model's {prefix!r} is a "
                f"dense {type(layer).__name__}: its config (sparsity, sparse_layers) does not match the checkpoint"
            )
        bits, values, stored_shape = (input_dict[s][0] for s in _SOURCES)
        shape = tuple(layer.weight.shape) if layer is not None else tuple(int(s) for s in stored_shape.tolist())
        if not torch.equal(stored_shape, torch.tensor(shape).to(stored_shape.dtype)):
            raise UsageError(f"{prefix}: stored shape {stored_shape.tolist()} differs from the model's {list(shape)}")
        return decompress_weight(bits.to(torch.uint8), values, shape, prefix)

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError(
            "the compressed layout is written by save_pretrained(state_dict=compress_state_dict(...)), not by reversing "
            "the loading conversion: save with save_original_format=False (the default of this model's save_pretrained)"
        )


def register_sparse_layouts(model_type: str) -> None:
    """Register the compressed layout's conversion for `model_type` (idempotent: it replaces an earlier one)."""
    converter = WeightConverter(
        source_patterns=list(_SOURCES),
        target_patterns=list(_TARGETS),
        operations=[DecodeSparseLayer()],
        force_cpu=True,  # decoded with numpy; transformers moves the results to their devices
    )
    register_checkpoint_conversion_mapping(model_type, [converter], overwrite=True)


@contextlib.contextmanager
def _recording_conversion_errors():
    _conversion_errors.messages = []
    try:
        yield _conversion_errors.messages
    finally:
        _conversion_errors.messages = None
