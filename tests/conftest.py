import os

# Test modules and the scripts they start (torchrun, accelerate launch, the CLI) import `helpers` from this folder.
os.environ["PYTHONPATH"] = os.pathsep.join(
    path for path in (os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")) if path
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from helpers import tiny_config

from hf_sparse_ift import SparseWideGPTForCausalLM


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return SparseWideGPTForCausalLM(tiny_config()).eval()


@pytest.fixture
def builtin_tokenizer():
    from transformers import AutoTokenizer

    from hf_sparse_ift.resources import builtin_dir

    return AutoTokenizer.from_pretrained(builtin_dir() / "tokenizer")
