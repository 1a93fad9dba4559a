"""hf-sparse-ift: Sparse Wide GPT models (Sparse-IFT, arXiv 2303.11525) for the Hugging Face stack.

Importing the package registers the model with AutoConfig / AutoModel / AutoModelForCausalLM (as soon as transformers
is imported, before or after this package), and marks the classes so that `save_pretrained` writes their code next to
the weights: checkpoints then load with ``trust_remote_code=True`` where this package is not installed. An older
release of a dependency than the tested floors (``models/sparse_wide_gpt/compat.py``) stops the import with one message
naming both versions.

The import itself is light: the public names are loaded on first use, and the registration waits for transformers,
so that ``hf-sparse-ift --help`` and argument errors need neither torch nor transformers.

Rooms (imports point down only): ``models`` (the model, self-contained for remote code) <- ``data`` / ``kernels``
(building the native CPU kernels) / ``sparsity`` (masks, dynamic sparse training) <- ``training`` / ``evaluation`` /
``hub`` <- ``study`` <- ``cli``.
"""

import importlib.abc
import importlib.util
import sys

from ._lazy import lazy_exports
from .models.sparse_wide_gpt.compat import MINIMUM_VERSIONS, check_versions

# The model checks its own dependencies on import; training and evaluation need the others too.
check_versions(MINIMUM_VERSIONS)

__version__ = "0.3.0"

_MODEL = ".models.sparse_wide_gpt"
_EXPORTS = {
    "BlockSparseLinear": _MODEL,
    "SparseLinear": _MODEL,
    "SparseWideGPTConfig": _MODEL,
    "SparseWideGPTForCausalLM": _MODEL,
    "SparseWideGPTModel": _MODEL,
    "SparseWideGPTPreTrainedModel": _MODEL,
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


def register_auto_classes() -> None:
    """Register the config and models with transformers' Auto classes and mark them for remote code (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .models.sparse_wide_gpt import SparseWideGPTConfig, SparseWideGPTForCausalLM, SparseWideGPTModel

    AutoConfig.register(SparseWideGPTConfig.model_type, SparseWideGPTConfig, exist_ok=True)
    AutoModel.register(SparseWideGPTConfig, SparseWideGPTModel, exist_ok=True)
    AutoModelForCausalLM.register(SparseWideGPTConfig, SparseWideGPTForCausalLM, exist_ok=True)
    SparseWideGPTConfig.register_for_auto_class()
    SparseWideGPTModel.register_for_auto_class("AutoModel")
    SparseWideGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")


# The Auto classes are registered once transformers is imported and no module of this package is half-imported (the
# model modules import transformers themselves, and registering imports them): right after whichever import of
# transformers or of a module of this package finishes last.
_importing: set[str] = set()
_registered = False


def _register_when_ready() -> None:
    global _registered
    if _registered or _importing or "transformers" not in sys.modules:
        return
    _registered = True
    register_auto_classes()


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Python's import-hook interface: wraps the loaders of transformers and of this package's modules so that ``import hf_sparse_ift``
    followed by ``AutoModelForCausalLM.from_pretrained`` finds the model, without this import loading torch itself."""

    def __init__(self, name: str, loader=None):
        self.name, self.loader = name, loader

    def find_spec(self, name, path=None, target=None):
        if _registered or not (name == "transformers" or name.startswith(__name__ + ".")):
            return None
        for finder in sys.meta_path:  # the finder that would have found it
            if not isinstance(finder, _RegisterAfterImport) and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _RegisterAfterImport(name, spec.loader)
                    return spec
        return None

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def __getattr__(self, name):
        # The rest of the wrapped loader's interface (get_code for ``python -m``, get_resource_reader, ...).
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def exec_module(self, module):
        _importing.add(self.name)
        try:
            self.loader.exec_module(module)
        finally:
            _importing.discard(self.name)
        _register_when_ready()


if "transformers" in sys.modules:
    _register_when_ready()
if not _registered and not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport("finder"))

__all__ = sorted(_EXPORTS) + ["register_auto_classes"]
