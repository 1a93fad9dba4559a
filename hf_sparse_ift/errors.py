"""The package's own refusals of bad input raise `UsageError` (or one of its file variants); see
`hf_sparse_ift.models.sparse_wide_gpt.errors`, where they are defined so that the model's remote code has them too."""

from .models.sparse_wide_gpt.errors import InputNotFoundError, NotWritableError, OutputExistsError, UsageError

__all__ = ["InputNotFoundError", "NotWritableError", "OutputExistsError", "UsageError"]
