"""Sparse Wide GPT: configuration, model, iso-FLOP arithmetic and GPT-2 conversion."""

from .configuration_sparse_wide_gpt import SparseWideGPTConfig
from .modeling_sparse_wide_gpt import (
    BlockSparseLinear,
    SparseLinear,
    SparseWideGPTForCausalLM,
    SparseWideGPTModel,
    SparseWideGPTPreTrainedModel,
)

__all__ = [
    "BlockSparseLinear",
    "SparseLinear",
    "SparseWideGPTConfig",
    "SparseWideGPTForCausalLM",
    "SparseWideGPTModel",
    "SparseWideGPTPreTrainedModel",
]
