"""Sparsity beyond the model: mask utilities and invariants, dynamic sparse training (`dst`)."""

from .masks import parameter_counts, sparse_layers

__all__ = ["parameter_counts", "sparse_layers"]
