"""Masks and dynamic sparse training on Sparse Wide models: the sparse layers of a model and their counts
(`masks`), layout conversions (`blocks`), checkpoint layouts, the spectral gap, and DST (`dst`)."""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"parameter_counts": ".masks", "sparse_layers": ".masks"})
__all__ = ["parameter_counts", "sparse_layers"]
