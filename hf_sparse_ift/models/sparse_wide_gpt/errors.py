"""The one error type of the package's own refusals of bad input (a value, a file, a checkpoint).

`UsageError` is a `ValueError`, so code that catches ``ValueError`` (transformers' convention for bad config values)
keeps working; the variants for files are also the matching `OSError`. The `hf-sparse-ift` command prints a
`UsageError` as one line and shows any other exception with its traceback: those are bugs. It lives in the model
folder, the bottom of the package, because the model's own config and load guards refuse bad input too and that
folder must stay self-contained (it is copied next to every checkpoint as remote code).
"""


class UsageError(ValueError):
    """Bad input: the message names the bad value and what would be valid."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what it must be)."""


class OutputExistsError(UsageError, FileExistsError):
    """A file or folder the command would write already exists, and overwriting it was not asked for."""


class NotWritableError(UsageError, PermissionError):
    """A place the command must write to cannot be written."""


__all__ = ["InputNotFoundError", "NotWritableError", "OutputExistsError", "UsageError"]
