"""Masks and dynamic sparse training on Sparse Wide models: the sparse layers of a model and their counts
(`masks`), layout conversions (`blocks`), checkpoint layouts, the spectral gap, and DST (`dst`)."""

from .._lazy import lazy_exports

_EXPORTS = {"parameter_counts": ".masks", "sparse_layers": ".masks"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
