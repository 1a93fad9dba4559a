"""Sparse Wide GPT: configuration, model, sparse layers, checkpoint layouts, iso-FLOP arithmetic and GPT-2 conversion.

The names below are imported on first use, so that importing a light module of this folder (`errors`) does not
import torch.
"""

import importlib

_EXPORTS = {
    "BlockSparseLinear": ".sparse_layers",
    "SparseLinear": ".sparse_layers",
    "SparseWideGPTConfig": ".configuration_sparse_wide_gpt",
    "SparseWideGPTForCausalLM": ".modeling_sparse_wide_gpt",
    "SparseWideGPTModel": ".modeling_sparse_wide_gpt",
    "SparseWideGPTPreTrainedModel": ".modeling_sparse_wide_gpt",
}


def __getattr__(name: str):
    # Self-contained on purpose (no helper from the rest of the package): remote code copies this folder's files only.
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
