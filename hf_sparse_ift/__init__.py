"""hf-sparse-ift: Sparse Wide GPT models (Sparse-IFT, arXiv 2303.11525) for the Hugging Face stack.

Importing the package registers the model with AutoConfig / AutoModel / AutoModelForCausalLM, and
marks the classes so that `save_pretrained` writes their code next to the weights: checkpoints then
load with ``trust_remote_code=True`` where this package is not installed. An older release of a dependency than
the tested floors (``models/sparse_wide_gpt/compat.py``) stops the import with one message naming both versions.

Rooms (imports point down only): ``models`` (the model, self-contained for remote code) <- ``sparsity``
(masks, dynamic sparse training) <- ``training`` / ``evaluation`` <- ``cli``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models.sparse_wide_gpt import (
    BlockSparseLinear,
    SparseLinear,
    SparseWideGPTConfig,
    SparseWideGPTForCausalLM,
    SparseWideGPTModel,
    SparseWideGPTPreTrainedModel,
)
from .models.sparse_wide_gpt.compat import MINIMUM_VERSIONS, check_versions

# The model checked its own dependencies on import; training and evaluation need the others too.
check_versions(MINIMUM_VERSIONS)

__version__ = "0.3.0"

AutoConfig.register(SparseWideGPTConfig.model_type, SparseWideGPTConfig, exist_ok=True)
AutoModel.register(SparseWideGPTConfig, SparseWideGPTModel, exist_ok=True)
AutoModelForCausalLM.register(SparseWideGPTConfig, SparseWideGPTForCausalLM, exist_ok=True)
SparseWideGPTConfig.register_for_auto_class()
SparseWideGPTModel.register_for_auto_class("AutoModel")
SparseWideGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "BlockSparseLinear",
    "SparseLinear",
    "SparseWideGPTConfig",
    "SparseWideGPTForCausalLM",
    "SparseWideGPTModel",
    "SparseWideGPTPreTrainedModel",
]
