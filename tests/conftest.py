import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from hf_sparse_ift import SparseWideGPTConfig, SparseWideGPTForCausalLM


def tiny_config(**overrides) -> SparseWideGPTConfig:
    values = dict(
        vocab_size=97,
        n_positions=32,
        n_layer=2,
        n_head=2,
        dense_hidden_size=16,
        sparsity=0.75,
        bos_token_id=0,
        eos_token_id=0,
    )
    values.update(overrides)
    return SparseWideGPTConfig(**values)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return SparseWideGPTForCausalLM(tiny_config()).eval()


@pytest.fixture
def builtin_tokenizer():
    from transformers import AutoTokenizer

    from hf_sparse_ift.resources import builtin_dir

    return AutoTokenizer.from_pretrained(builtin_dir() / "tokenizer")
