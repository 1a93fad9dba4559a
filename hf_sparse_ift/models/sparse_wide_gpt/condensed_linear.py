"""Condensed sparse linears: only the active weights, with their input indices, computed without reading a zero.

`CondensedLinear` replaces a masked sparse layer for inference (`condense_model`, ``model.condense()``). Rows (output
neurons) with no active weight — the neurons SRigL ablated — are dropped: their output is the bias alone. The rest
are stored by rows, with input indices sorted within a row:

* constant fan-in k (SRigL): ``values`` and ``col_indices`` are dense ``[rows, k]`` matrices;
* variable fan-in (SET, RigL, static random masks): CSR, ``values`` and ``col_indices`` ``[nnz]`` plus ``row_ptr``
  ``[rows + 1]`` (measured against padding every row to the largest fan-in: see `benchmarks/condensed_inference.py`);
* ``row_ids`` ``[rows]``: the output position of each stored row; ``weight_shape`` ``[2]``: ``(out, in)``.

Indices are int16 when ``in_features`` < 32768 (int32 otherwise): at batch 1 decoding is memory-bound, and every
active weight costs its value plus its index in bytes read per token.

A condensed model's ``config.sparse_format`` lists each condensed layer's sizes (`condensed_layer_specs`), so
``from_pretrained`` builds the condensed layers before loading and every tensor loads under its own name and dtype.

Compute. On CPU the native kernel (``condensed_kernel.c``, built ahead of time by ``hf-sparse-ift build-kernels``; see
`condensed_kernel.py`) walks the rows on ``torch.get_num_threads()`` threads. For one token with fp32 values it reads
each row's inputs from a bit mask (built from ``col_indices`` at the first such call and kept with the layer, not
saved) where the library has the AVX-512 form of that path: fewer bytes per token than an index per weight. Without a
built kernel, with ``HF_SPARSE_IFT_KERNEL=0``, off the CPU, or when a gradient is needed, the layer computes the same
sums with torch: a CSR matmul (`torch.sparse.mm`), or `torch.nn.functional.embedding_bag` when a gradient is needed;
on CPU both are slower than the kernel. The values are frozen: a condensed layer is for inference and refuses ``train()``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .condensed_kernel import load_kernel
from .errors import UsageError
from .layer_utils import is_masked_layer, replace_submodule

CONDENSED_FORMAT = "condensed-v1"
REPRESENTATIONS = ("auto", "csr", "padded")

__all__ = [
    "CONDENSED_FORMAT",
    "REPRESENTATIONS",
    "CondensedLinear",
    "condense_model",
    "condensed_layer_specs",
    "install_condensed_layers",
    "kernel_available",
]


def kernel_available() -> bool:
    """Whether condensed layers on CPU compute with the built native kernel (else with torch)."""
    return load_kernel() is not None


def check_representation(representation: str) -> None:
    if representation not in REPRESENTATIONS:
        raise UsageError(f"representation={representation!r} is invalid: expected one of {list(REPRESENTATIONS)}")


def _index_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features <= 2**15 - 1 else torch.int32


class CondensedLinear(nn.Module):
    """``y = x Wᵀ + b`` for a sparse ``W`` stored as its active weights and their input indices (see module doc)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rows: int,
        fan_in: int | None = None,
        nnz: int | None = None,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if (fan_in is None) == (nnz is None):
            raise UsageError("CondensedLinear needs exactly one of fan_in (constant fan-in) or nnz (CSR)")
        if not 0 <= rows <= out_features:
            raise UsageError(f"rows={rows} is invalid: expected 0 <= rows <= out_features={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in = fan_in
        shape = (rows, fan_in) if fan_in is not None else (nnz,)
        # Zeros until loaded or filled by `from_sparse`: a layer built from a config alone computes its bias.
        self.values = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype), requires_grad=False)
        self.register_buffer("col_indices", torch.zeros(shape, dtype=_index_dtype(in_features), device=device))
        if fan_in is None:
            self.register_buffer("row_ptr", torch.zeros(rows + 1, dtype=torch.int64, device=device))
        self.register_buffer("row_ids", torch.zeros(rows, dtype=torch.int64, device=device))
        self.register_buffer(
            "weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64, device=device)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.bias = None
        self._constant_row_ptr = None
        self._input_masks = None  # (key, masks) for the one-token kernel path, see `_row_input_masks`
        self.train(False)

    # -- construction ---------------------------------------------------------------------------
    def spec(self) -> dict:
        """The sizes that rebuild this layer empty (``CondensedLinear(**spec)``), as `condensed_layer_specs` records."""
        spec = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rows": self.row_ids.numel(),
            "bias": self.bias is not None,
        }
        if self.fan_in is not None:
            spec["fan_in"] = self.fan_in
        else:
            spec["nnz"] = self.values.numel()
        return spec

    @classmethod
    @torch.no_grad()
    def from_sparse(cls, layer: nn.Module, representation: str = "auto") -> CondensedLinear:
        """Condense a masked linear (``weight`` with a bool ``weight_mask``). Outputs stay those of the masked layer.

        representation: ``auto`` (``[rows, k]`` when every kept row has the same fan-in, else CSR), ``csr``, or
        ``padded`` (every kept row padded to the largest fan-in with zero weights at input 0).
        """
        check_representation(representation)
        if not is_masked_layer(layer) or layer.weight_mask.shape != layer.weight.shape:
            raise UsageError(
                f"{type(layer).__name__} has no bool weight_mask of its weight's shape: nothing to condense"
            )
        mask = layer.weight_mask
        out_features, in_features = mask.shape
        device, dtype = layer.weight.device, layer.weight.dtype
        m = mask.detach().cpu().numpy()
        fan = m.sum(axis=1)
        kept = np.flatnonzero(fan)
        flat = np.flatnonzero(m[kept].reshape(-1))  # row-major: rows in order, columns sorted within a row
        cols = (flat % in_features).astype(np.int64)
        weight = layer.weight.detach().cpu()
        values = weight[torch.from_numpy(kept)].reshape(-1)[torch.from_numpy(flat)]
        fans = fan[kept]
        constant = len(fans) > 0 and bool((fans == fans[0]).all())
        bias = layer.bias is not None
        if representation == "csr" or (representation == "auto" and not constant):
            condensed = cls(in_features, out_features, len(kept), nnz=len(flat), bias=bias, device="cpu", dtype=dtype)
            condensed.values.copy_(values)
            condensed.col_indices.copy_(torch.from_numpy(cols))
            condensed.row_ptr.copy_(torch.from_numpy(np.concatenate([[0], np.cumsum(fans)]).astype(np.int64)))
        else:
            k = int(fans.max()) if len(fans) else 0
            condensed = cls(in_features, out_features, len(kept), fan_in=k, bias=bias, device="cpu", dtype=dtype)
            # Slot j of row r holds its j-th active weight; slots beyond its fan-in (padding) hold 0 at input 0.
            starts = np.concatenate([[0], np.cumsum(fans)[:-1]])
            slot = np.arange(len(flat)) - np.repeat(starts, fans)
            row = np.repeat(np.arange(len(kept)), fans)
            condensed.values[torch.from_numpy(row), torch.from_numpy(slot)] = values
            condensed.col_indices[torch.from_numpy(row), torch.from_numpy(slot)] = torch.from_numpy(cols).to(
                condensed.col_indices.dtype
            )
        condensed.row_ids.copy_(torch.from_numpy(kept.astype(np.int64)))
        if bias:
            condensed.bias.copy_(layer.bias.detach())
        return condensed.to(device)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, mask) of the equivalent masked layer (padding slots of the ``padded`` form are not active)."""
        weight = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device)
        mask = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=self.values.device)
        row_ptr = self._row_ptr()
        counts = row_ptr[1:] - row_ptr[:-1]
        rows = torch.repeat_interleave(self.row_ids, counts)
        cols = self.col_indices.reshape(-1).long()
        values = self.values.detach().reshape(-1)
        if self.fan_in is not None:  # drop padding slots: input 0 anywhere but the first slot (columns are sorted)
            keep = ~((cols == 0) & (torch.arange(cols.numel(), device=cols.device) % self.fan_in > 0))
            rows, cols, values = rows[keep], cols[keep], values[keep]
        weight[rows, cols] = values
        mask[rows, cols] = True
        return weight, mask

    def train(self, mode: bool = True) -> CondensedLinear:
        """Refused: the values are frozen (no optimizer moves them and the native kernel has no backward). Train the
        masked model the condensed one was made from."""
        if mode:
            raise UsageError(
                "A condensed model is for inference: its values are frozen, so training it would silently change "
                "nothing. Train the masked (uncondensed) checkpoint instead, then condense it again."
            )
        return super().train(False)

    # -- compute --------------------------------------------------------------------------------
    def _row_ptr(self) -> torch.Tensor:
        if self.fan_in is None:
            return self.row_ptr
        rows = self.values.shape[0]
        cached = self._constant_row_ptr
        if cached is None or cached.device != self.values.device or cached.numel() != rows + 1:
            cached = torch.arange(rows + 1, dtype=torch.int64, device=self.values.device) * self.fan_in
            self._constant_row_ptr = cached
        return cached

    def _row_input_masks(self) -> torch.Tensor:
        """(rows, ceil(in / 64)) int64 words: bit c of row r's words is set when input c is one of the row's active
        weights (padding slots of the ``padded`` form are not). Built once per set of indices and kept."""
        key = (self.col_indices.data_ptr(), self.col_indices._version, self.col_indices.shape)
        if self._input_masks is not None and self._input_masks[0] == key:
            return self._input_masks[1]
        rows, words = self.row_ids.numel(), -(-self.in_features // 64)
        cols = self.col_indices.reshape(-1).long().cpu().numpy()
        row_ptr = self._row_ptr().cpu().numpy()
        row = np.repeat(np.arange(rows), np.diff(row_ptr))
        keep = np.ones(cols.shape, dtype=bool)
        if self.fan_in is not None:  # padding slots: input 0 anywhere but a row's first slot (columns are sorted)
            keep = ~((cols == 0) & (np.arange(cols.size) % max(self.fan_in, 1) > 0))
        masks = np.zeros(rows * words, dtype=np.uint64)
        bits = np.left_shift(np.uint64(1), (cols[keep] % 64).astype(np.uint64))
        np.bitwise_or.at(masks, row[keep] * words + cols[keep] // 64, bits)
        tensor = torch.from_numpy(masks.view(np.int64)).view(rows, words)
        self._input_masks = (key, tensor)
        return tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.values.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        if x.device.type != "cpu" or needs_grad or self.values.dtype not in (torch.float32, torch.bfloat16):
            return self._torch_forward(x)
        lib = load_kernel()
        if lib is None:
            return self._torch_forward(x)
        return self._kernel_forward(lib, x)

    def _kernel_forward(self, lib, x: torch.Tensor) -> torch.Tensor:
        """The forward through the native kernel: one dot product per row for one token, token tiles for more."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        tokens, rows = x2.shape[0], self.row_ids.numel()
        if rows == self.out_features:
            y = x2.new_empty(tokens, self.out_features)
        elif self.bias is not None:  # dropped rows output their bias
            y = self.bias.to(torch.float32).expand(tokens, -1).clone()
        else:
            y = x2.new_zeros(tokens, self.out_features)
        if tokens and rows:
            bias = self.bias.to(torch.float32).contiguous() if self.bias is not None else None
            value_type = "bf16" if self.values.dtype == torch.bfloat16 else "f32"
            index_type = "i16" if self.col_indices.dtype == torch.int16 else "i32"
            args = (
                self.values.data_ptr(),
                self.col_indices.data_ptr(),
                self._row_ptr().data_ptr(),
                self.row_ids.data_ptr(),
                bias.data_ptr() if bias is not None else None,
            )
            threads = torch.get_num_threads()
            if tokens == 1 and value_type == "f32" and lib.gemv_mask_native():
                masks = self._row_input_masks()
                lib.gemv_mask_f32(x2.data_ptr(), args[0], masks.data_ptr(), *args[2:], y.data_ptr(), rows,
                                  masks.shape[1], threads)  # fmt: skip
            elif tokens == 1:
                gemv = getattr(lib, f"gemv_{value_type}_{index_type}")
                gemv(x2.data_ptr(), *args, y.data_ptr(), rows, threads)
            else:
                tile = 64 if tokens >= 48 else 16
                blocks = -(-tokens // tile)
                xb = x2.new_zeros(blocks * tile, self.in_features)
                xb[:tokens] = x2
                xb = xb.view(blocks, tile, self.in_features).transpose(1, 2).contiguous()
                spmm = getattr(lib, f"spmm{tile}_{value_type}_{index_type}")
                spmm(xb.data_ptr(), *args, y.data_ptr(), rows, self.in_features, self.out_features, tokens, threads)
        return y.to(x.dtype).view(*lead, self.out_features)

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same sums with torch ops: a CSR matmul (MKL / cuSPARSE), or `embedding_bag` when a gradient is needed
        (sparse CSR matmuls have no gradient for their values). Both accumulate bf16 / fp16 in fp32."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        row_ptr = self._row_ptr()
        cols = self.col_indices.reshape(-1)
        values = self.values.reshape(-1).to(compute)
        if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
            y_rows = F.embedding_bag(
                cols.long(), x2.t().to(compute).contiguous(), row_ptr[:-1], mode="sum", per_sample_weights=values
            ).t()  # [tokens, rows]
        else:
            index = torch.int32 if values.numel() < 2**31 else torch.int64
            csr = torch.sparse_csr_tensor(
                row_ptr.to(index), cols.to(index), values, (self.row_ids.numel(), self.in_features)
            )
            y_rows = torch.sparse.mm(csr, x2.t().to(compute)).t()
        y = x2.new_zeros(x2.shape[0], self.out_features, dtype=compute).index_copy(1, self.row_ids, y_rows)
        if self.bias is not None:
            y = y + self.bias.to(compute)
        return y.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        kind = f"fan_in={self.fan_in}" if self.fan_in is not None else f"nnz={self.values.numel()} (csr)"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rows={self.row_ids.numel()}, "
            f"{kind}, bias={self.bias is not None}"
        )


# ----------------------------------------------------------------------------------------------
# Whole models
# ----------------------------------------------------------------------------------------------
def condensed_layer_specs(model: nn.Module) -> dict[str, dict]:
    """Layer name (relative to the base model) -> `CondensedLinear.spec` of every condensed layer of `model`."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, model) if prefix else model
    return {name: m.spec() for name, m in base.named_modules() if isinstance(m, CondensedLinear)}


def sparse_format_of_condensed(model: nn.Module) -> dict:
    """What ``config.sparse_format`` says about a condensed model: the layout and each condensed layer's sizes."""
    return {"format": CONDENSED_FORMAT, "layers": condensed_layer_specs(model)}


@torch.no_grad()
def condense_model(model: nn.Module, representation: str = "auto") -> nn.Module:
    """Replace every masked sparse linear of `model` by a `CondensedLinear` (in place); returns the model."""
    check_representation(representation)
    targets = [name for name, module in model.named_modules() if is_masked_layer(module)]
    for name in targets:
        replace_submodule(model, name, CondensedLinear.from_sparse(model.get_submodule(name), representation))
    config = getattr(model, "config", None)
    if config is not None and targets:
        config.sparse_format = sparse_format_of_condensed(model)
    return model


def install_condensed_layers(base_model: nn.Module, sparse_format: dict | None) -> None:
    """Build the condensed layers that ``config.sparse_format`` lists, empty, in place of the masked ones (called while
    the model is built, so that ``from_pretrained`` loads every condensed tensor under its own name and dtype)."""
    if not isinstance(sparse_format, dict) or sparse_format.get("format") != CONDENSED_FORMAT:
        return
    layers = sparse_format.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise UsageError(
            f"config.sparse_format names {CONDENSED_FORMAT} but lists no condensed layer sizes (checkpoints condensed "
            "before the sizes were recorded in config.json). Condense the masked checkpoint again with "
            "`hf-sparse-ift condense`."
        )
    names = {name for name, _ in base_model.named_modules()}
    for name, spec in layers.items():
        if name not in names:
            raise UsageError(f"config.sparse_format lists a condensed layer {name!r} that this model does not have")
        replace_submodule(base_model, name, CondensedLinear(**spec))
