"""Sparse Wide GPT: configuration, model, iso-FLOP arithmetic and GPT-2 conversion."""

from .configuration_sparse_wide_gpt import SparseWideGPTConfig
from .modeling_sparse_wide_gpt import SparseWideGPTForCausalLM, SparseWideGPTModel, SparseWideGPTPreTrainedModel
from .sparse_layers import BlockSparseLinear, SparseLinear

__all__ = [
    "BlockSparseLinear",
    "SparseLinear",
    "SparseWideGPTConfig",
    "SparseWideGPTForCausalLM",
    "SparseWideGPTModel",
    "SparseWideGPTPreTrainedModel",
]
