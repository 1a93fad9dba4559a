"""The Auto classes register however the package is first imported: the registration waits until transformers is
loaded and no module of the package is half-imported (it imports the model modules itself)."""

import subprocess
import sys

import pytest

CHECK = """
{first}
from transformers import AutoConfig
import hf_sparse_ift
assert hf_sparse_ift._registered
print(type(AutoConfig.for_model("sparse_wide_gpt")).__name__)
"""


@pytest.mark.parametrize(
    "first",
    [
        "import hf_sparse_ift",
        "import transformers",
        "from hf_sparse_ift.sparsity.dst import DSTEngine",  # sparse_layers -> config -> transformers, mid-import
        "from hf_sparse_ift.models.sparse_wide_gpt.configuration_sparse_wide_gpt import SparseWideGPTConfig",
        "from hf_sparse_ift.models.sparse_wide_gpt.block_sparse import block_sparse_linear",
        "import hf_sparse_ift.models.sparse_wide_gpt.sparse_safetensors",  # what `evaluate` loads first, to hash
    ],
)
def test_the_auto_classes_register_whatever_is_imported_first(first):
    done = subprocess.run(
        [sys.executable, "-c", CHECK.format(first=first)], capture_output=True, text=True, timeout=300
    )
    assert done.stdout.strip() == "SparseWideGPTConfig", done.stderr[-3000:]
