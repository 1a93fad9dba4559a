"""Lossless compressed safetensors checkpoints for sparse linears: packed mask bits plus the active values.

Layout ``bitmask-values-v1``. Every sparse linear ``P`` (a module with ``P.weight`` and a bool ``P.weight_mask`` of
the same shape) is stored as three tensors instead of two:

* ``P.weight_bitmask``: uint8 ``[ceil(out·in / 8)]``, the mask flattened row-major, 8 positions per byte, least
  significant bit first (``numpy.packbits(..., bitorder="little")``); padding bits are 0.
* ``P.weight_active_values``: ``[number of set bits]`` in the weight's dtype, the weights at the active positions in
  row-major order, copied bit for bit (an active weight that is exactly 0, as DST regrows them, stays an active 0).
* ``P.weight_shape``: int64 ``[2]``, ``(out, in)``.

Everything else (biases, embeddings, norms) is stored as usual. The mask is *stored*, never inferred from zeros.
Every shard's safetensors metadata carries ``sparse_format: bitmask-values-v1`` and ``config.json`` carries
``"sparse_format": {"format": "bitmask-values-v1", ...}``. Loading rebuilds ``weight`` (inactive positions +0.0) and
``weight_mask`` exactly; plain checkpoints (``P.weight`` + ``P.weight_mask``) load as before.

`SparseCheckpointMixin` puts this into `save_pretrained` / `push_to_hub` (``sparse_format="plain"`` keeps the plain
layout) and into `from_pretrained`, for the installed package and for ``trust_remote_code`` checkpoints alike (this file
is copied next to the model code). It also loads checkpoints of condensed models (see `condensed.py`). No pickle: only
safetensors files and JSON.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
from transformers import PreTrainedModel

from .condensed import CONDENSED_FORMAT, CondensedLinear, condense_model, condensed_layer_shapes, expand_active

BITMASK_FORMAT = "bitmask-values-v1"
PLAIN = "plain"
MASK_SUFFIX = ".weight_bitmask"
VALUES_SUFFIX = ".weight_active_values"
SHAPE_SUFFIX = ".weight_shape"
METADATA_KEY = "sparse_format"
KNOWN_FORMATS = (BITMASK_FORMAT, CONDENSED_FORMAT)

__all__ = [
    "BITMASK_FORMAT",
    "PLAIN",
    "SparseCheckpointMixin",
    "compress_state_dict",
    "compress_weight",
    "decompress_state_dict",
    "decompress_weight",
    "format_config",
    "is_compressed_state_dict",
]

# Integer dtypes of each width: values are moved between torch and numpy as raw bits (numpy has no bfloat16).
_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def format_config(fmt: str = BITMASK_FORMAT) -> dict:
    """What ``config.json`` records about the layout (``config.sparse_format``)."""
    if fmt == BITMASK_FORMAT:
        return {
            "format": BITMASK_FORMAT,
            "mask": "uint8 <layer>.weight_bitmask: row-major, least significant bit first",
            "values": "<layer>.weight_active_values: active weights in row-major order, weight dtype",
            "shape": "int64 <layer>.weight_shape: (out_features, in_features)",
        }
    return {"format": fmt}


def _as_bits(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a numpy integer array of the same element width (no copy)."""
    t = t.detach().to("cpu").contiguous()
    return t.view(_INT_OF_WIDTH[t.element_size()]).numpy()


def compress_weight(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bits, active values, shape) of one sparse weight. Values are copied bit for bit, active zeros included."""
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"weight {tuple(weight.shape)} needs a bool mask of the same shape, got {mask.dtype} {tuple(mask.shape)}"
        )
    flat_mask = _as_bits(mask).reshape(-1).view(np.bool_)
    values = np.compress(flat_mask, _as_bits(weight).reshape(-1))
    values = torch.from_numpy(values).view(weight.dtype)
    bits = torch.from_numpy(np.packbits(flat_mask, bitorder="little"))
    return bits, values, torch.tensor(list(weight.shape), dtype=torch.int64)


def decompress_weight(
    bits: torch.Tensor, values: torch.Tensor, shape, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, mask) from `compress_weight`'s output. Inactive positions are +0.0."""
    shape = tuple(int(s) for s in (shape.tolist() if isinstance(shape, torch.Tensor) else shape))
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name}: stored shape {shape} is not a 2-D weight shape")
    numel = shape[0] * shape[1]
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (numel + 7) // 8:
        raise ValueError(
            f"{name}: mask bits of shape {tuple(bits.shape)} and dtype {bits.dtype} do not fit a weight "
            f"of shape {shape}: expected uint8 [{(numel + 7) // 8}]"
        )
    if values.dim() != 1:
        raise ValueError(f"{name}: stored values must be 1-D, got shape {tuple(values.shape)}")
    packed, raw = _as_bits(bits), _as_bits(values)
    if numel % 8 and packed[-1] >> (numel % 8):
        raise ValueError(f"{name}: mask bits for shape {shape} have non-zero padding bits in the last byte")
    try:
        decoded = expand_active(packed, raw, numel)  # one pass in C when the kernel is available
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if decoded is None:
        flat = np.unpackbits(packed, count=numel, bitorder="little").view(np.bool_)
        count = int(np.count_nonzero(flat))
        if raw.size != count:
            raise ValueError(f"{name}: {raw.size} stored values for a mask with {count} active positions")
        dense = np.zeros(numel, dtype=raw.dtype)
        dense[np.flatnonzero(flat)] = raw  # positions, then one scatter: faster than boolean-mask assignment
        decoded = dense, flat
    dense, flat = decoded
    return torch.from_numpy(dense).view(values.dtype).view(shape), torch.from_numpy(flat).view(shape)


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
        if key.endswith(".weight_mask") and key[: -len(".weight_mask")] in prefixes:
            continue
        if key.endswith(".weight") and key[: -len(".weight")] in prefixes:
            prefix = key[: -len(".weight")]
            weight, mask = tensor, state_dict[prefix + ".weight_mask"]
            if hasattr(weight, "full_tensor"):  # a DTensor from a sharded model
                weight = weight.full_tensor()
            bits, values, shape = compress_weight(weight, mask)
            out[prefix + MASK_SUFFIX], out[prefix + VALUES_SUFFIX], out[prefix + SHAPE_SUFFIX] = bits, values, shape
            continue
        out[key] = tensor
    return out


def _compressed_prefixes(keys) -> list[str]:
    keys = set(keys)
    # `.weight_shape` alone also belongs to condensed layers (condensed.py): a bitmask or values key makes a layer ours.
    prefixes = {k[: -len(s)] for k in keys for s in (MASK_SUFFIX, VALUES_SUFFIX) if k.endswith(s)}
    for p in prefixes:
        missing = [p + s for s in (MASK_SUFFIX, VALUES_SUFFIX, SHAPE_SUFFIX) if p + s not in keys]
        if missing:
            raise ValueError(
                f"compressed layer {p!r} is incomplete: missing {missing} ({BITMASK_FORMAT} stores "
                f"{MASK_SUFFIX}, {VALUES_SUFFIX} and {SHAPE_SUFFIX} for each sparse layer)"
            )
    return sorted(prefixes)


def is_compressed_state_dict(keys) -> bool:
    return any(k.endswith((MASK_SUFFIX, VALUES_SUFFIX)) for k in keys)


def decompress_state_dict(state_dict: dict) -> dict:
    """``bitmask-values-v1`` state dict (tensors or safetensors slices) -> plain state dict (``P.weight`` +
    ``P.weight_mask``); other entries are passed through."""
    return {key: entry[...] for key, entry in _lazy_state_dict(state_dict).items()}


# ----------------------------------------------------------------------------------------------
# Lazy decoding for from_pretrained: transformers materialises each state-dict entry with ``entry[...]`` in its
# loader threads, so a layer is decoded only when its tensors are loaded (numpy releases the GIL while it works).
# ----------------------------------------------------------------------------------------------
class _LayerDecoder:
    def __init__(self, prefix: str, bits, values, shape):
        self.prefix, self._parts, self._lock, self._result, self._served = (
            prefix,
            (bits, values, shape),
            threading.Lock(),
            None,
            set(),
        )

    def get(self, part: str) -> torch.Tensor:
        with self._lock:
            if self._result is None:
                bits, values, shape = (p[...] for p in self._parts)
                weight, mask = decompress_weight(bits, values, shape, self.prefix)
                self._result = {"weight": weight, "weight_mask": mask}
            tensor = self._result[part]
            self._served.add(part)
            if len(self._served) == 2:  # both handed out: drop our references
                self._result, self._parts = {}, None
            return tensor


class _Lazy:
    """Stands in for a safetensors slice: ``obj[...]`` (or a slice of it, as tensor-parallel loading takes) decodes
    once per layer and returns the tensor; ``get_shape`` / ``get_dtype`` answer without decoding."""

    def __init__(self, decoder: _LayerDecoder, part: str, shape: list[int], dtype: str):
        self.decoder, self.part, self._shape, self._dtype = decoder, part, shape, dtype

    def __getitem__(self, item):
        return self.decoder.get(self.part)[item]

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return self._dtype


def _lazy_state_dict(sources: dict) -> dict:
    """Key -> safetensors slice (or tensor); compressed layers replaced by lazy ``weight`` / ``weight_mask`` entries."""
    prefixes = set(_compressed_prefixes(sources))
    out = {}
    for key, value in sources.items():
        prefix = next((key[: -len(s)] for s in (MASK_SUFFIX, VALUES_SUFFIX, SHAPE_SUFFIX) if key.endswith(s)), None)
        if prefix not in prefixes:
            out[key] = value
        elif key.endswith(MASK_SUFFIX):
            values, shape = sources[prefix + VALUES_SUFFIX], sources[prefix + SHAPE_SUFFIX]
            decoder = _LayerDecoder(prefix, value, values, shape)
            dims = [int(d) for d in (shape[...] if not isinstance(shape, torch.Tensor) else shape).tolist()]
            dtype = values.get_dtype() if hasattr(values, "get_dtype") else str(values.dtype)
            out[prefix + ".weight"] = _Lazy(decoder, "weight", dims, dtype)
            out[prefix + ".weight_mask"] = _Lazy(decoder, "weight_mask", dims, "BOOL")
    return out


# ----------------------------------------------------------------------------------------------
# Writing the format name into each shard's safetensors metadata. transformers writes shards with
# `modeling_utils.safe_save_file(tensors, filename, metadata={"format": "pt"})`; while one of our saves runs, that
# function is wrapped (for the saving thread only) to add our key.
# ----------------------------------------------------------------------------------------------
_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _shard_metadata(extra: dict):
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_save_file", None)
    if original is None:  # a transformers without this hook: config.json still records the format
        yield
        return
    owner = threading.get_ident()

    def save_file(tensors, filename, metadata=None):
        if threading.get_ident() == owner:
            metadata = {**(metadata or {}), **extra}
        return original(tensors, filename, metadata=metadata)

    with _PATCH_LOCK:
        modeling_utils.safe_save_file = save_file
        try:
            yield
        finally:
            modeling_utils.safe_save_file = original


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
        if isinstance(m, CondensedLinear)
        or (isinstance(getattr(m, "weight_mask", None), torch.Tensor) and isinstance(m, torch.nn.Linear))
    }
    if len(kinds) > 1:
        raise ValueError("the model mixes condensed and masked sparse layers; condense all of them or none")
    return kinds.pop() if kinds else None


def _checkpoint_format(metadatas: list[dict | None], config) -> None:
    """Refuse a checkpoint whose metadata or config names a layout this code does not know (e.g. a newer version)."""
    named = {m.get(METADATA_KEY) for m in metadatas if m and m.get(METADATA_KEY)}
    configured = getattr(config, "sparse_format", None)
    if isinstance(configured, dict) and configured.get("format"):
        named.add(configured["format"])
    unknown = sorted(named - set(KNOWN_FORMATS))
    if unknown:
        raise ValueError(
            f"checkpoint sparse_format {unknown[0]!r} is not supported by this code; supported: "
            f"{list(KNOWN_FORMATS)} (and the plain layout)"
        )


class SparseCheckpointMixin:
    """`save_pretrained` / `push_to_hub` / `from_pretrained` with the compressed and condensed layouts."""

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
            raise ValueError(f"sparse_format={sparse_format!r} is invalid: expected one of {list(valid)} or None")
        if held == CONDENSED_FORMAT:
            if wanted not in ("auto",):
                raise ValueError(
                    f"sparse_format={sparse_format!r} is invalid for a condensed model: it holds no masks "
                    f"or dense weights; save it with sparse_format='auto' ({CONDENSED_FORMAT})"
                )
            with (
                _config_format(self.config, format_config(CONDENSED_FORMAT)),
                _shard_metadata({METADATA_KEY: CONDENSED_FORMAT}),
            ):
                return super().save_pretrained(save_directory, is_main_process, state_dict, *args, **kwargs)
        if held is None or wanted == PLAIN or kwargs.get("distributed_checkpoint"):
            with _config_format(self.config, None):
                return super().save_pretrained(save_directory, is_main_process, state_dict, *args, **kwargs)
        if state_dict is None:
            state_dict = self.state_dict()
        state_dict = compress_state_dict(state_dict)
        with (
            _config_format(self.config, format_config(BITMASK_FORMAT)),
            _shard_metadata({METADATA_KEY: BITMASK_FORMAT}),
        ):
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
        """Replace every masked sparse linear by a `CondensedLinear` (in place; see `condensed.py`). Returns the model."""
        return condense_model(self, representation)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        """Decode compressed layers lazily and give condensed layers their stored shapes, then load as usual."""
        handles = []
        try:
            if (
                state_dict is None
                and checkpoint_files
                and all(str(f).endswith(".safetensors") for f in checkpoint_files)
            ):
                from safetensors import safe_open

                sources, metadatas = {}, []
                for file in checkpoint_files:
                    handle = safe_open(file, framework="pt", device="cpu")
                    handles.append(handle)
                    metadatas.append(handle.metadata())
                    for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                        sources[key] = handle.get_slice(key)
                _checkpoint_format(metadatas, model.config)
                _install_condensed_layers(model, sources)
                if is_compressed_state_dict(sources):
                    state_dict = _lazy_state_dict(sources)
            elif state_dict is not None:
                _install_condensed_layers(model, state_dict)
                if is_compressed_state_dict(state_dict):
                    state_dict = decompress_state_dict(state_dict)
            return PreTrainedModel._load_pretrained_model(
                model, state_dict, checkpoint_files, load_config, *args, **kwargs
            )
        finally:
            for handle in handles:
                handle.__exit__(None, None, None)


def _install_condensed_layers(model, sources: dict) -> None:
    """Replace the masked layers that the checkpoint stores condensed by `CondensedLinear`s of the stored sizes."""
    layers = condensed_layer_shapes(sources)
    if not layers:
        return
    prefix = getattr(model, "base_model_prefix", "") + "."
    names = {name for name, _ in model.named_modules()}
    for key, spec in layers.items():
        name = key
        if name not in names and name.startswith(prefix) and name[len(prefix) :] in names:
            name = name[len(prefix) :]
        elif name not in names and prefix + name in names:
            name = prefix + name
        if name not in names:
            raise ValueError(f"checkpoint has a condensed layer {key!r} that this model does not have")
        old = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = getattr(old, "weight", None)
        dtype = weight.dtype if weight is not None else torch.get_default_dtype()
        device = weight.device if weight is not None else None
        setattr(parent, child, CondensedLinear.empty(spec, dtype=dtype, device=device))
    model.config.sparse_format = format_config(CONDENSED_FORMAT)
