"""Spectral metrics of sparse masks seen as bipartite graphs (Sparse-IFT §3.1 and Appendix B, after
Hoang et al., "Revisiting pruning at initialization through the lens of Ramanujan graph", ICLR 2023).

A sparse layer with mask M ∈ {0,1}^{out×in} is a bipartite graph: inputs on one side, outputs on the
other, one edge per active weight. Its adjacency matrix is A = [[0, M], [Mᵀ, 0]], whose eigenvalues are
±σᵢ(M), the singular values of M. So

* μ₀(A) = σ₁(M), the trivial eigenvalue; μ̂(A) = σ₂(M), the largest non-trivial one (−σ₁ is the
  bipartite mirror of μ₀ and is trivial too);
* d = 2·|E| / (in + out), the average number of edges per node;
* Ramanujan gap  Δr = 2·sqrt(d − 1) − μ̂(A)  (the paper's formula; larger: better connected, closer
  to an expander);
* weighted spectral gap  λ = μ₀(|W|) − μ̂(|W|), the same construction on the magnitudes of the active
  weights (bipartite biadjacency |W ⊙ M|).

Only the two largest singular values are needed: exact ``torch.linalg.svdvals`` for matrices up to
4M entries, a randomised low-rank SVD (``torch.svd_lowrank``) above that (GPT-3 Small's 6144×1536 FFN
layers), which is accurate for the top of the spectrum.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UsageError
from .masks import sparse_layers

EXACT_LIMIT = 4_000_000


@torch.no_grad()
def top_singular_values(matrix: torch.Tensor, k: int = 2) -> list[float]:
    """The `k` largest singular values of a 2-D tensor, in float64 for small matrices."""
    if matrix.dim() != 2:
        raise UsageError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    m = matrix.detach()
    if m.numel() <= EXACT_LIMIT:
        values = torch.linalg.svdvals(m.to(torch.float64 if m.device.type == "cpu" else torch.float32))
    else:
        generator_state = torch.random.get_rng_state()  # svd_lowrank draws random numbers: do not disturb training
        try:
            torch.manual_seed(0)
            _, values, _ = torch.svd_lowrank(m.float(), q=min(k + 8, *m.shape), niter=6)
        finally:
            torch.random.set_rng_state(generator_state)
    values = values.sort(descending=True).values[:k].tolist()
    return values + [0.0] * (k - len(values))


def mask_graph_stats(mask: torch.Tensor, weight: torch.Tensor | None = None) -> dict[str, float]:
    """Ramanujan gap of one layer's mask graph and, when `weight` is given, its weighted spectral gap."""
    m = mask.to(torch.float32)
    out_features, in_features = m.shape
    edges = float(m.sum())
    degree = 2.0 * edges / (out_features + in_features)
    mu0, mu_hat = top_singular_values(m)
    stats = {
        "avg_degree": degree,
        "mu0": mu0,
        "mu_hat": mu_hat,
        "ramanujan_gap": 2.0 * math.sqrt(max(degree - 1.0, 0.0)) - mu_hat,
    }
    if weight is not None:
        w0, w_hat = top_singular_values((weight.detach().float() * m).abs())
        stats["weighted_spectral_gap"] = w0 - w_hat
    return stats


def model_spectral_stats(model: nn.Module, weighted: bool = True) -> dict[str, dict[str, float]]:
    """`mask_graph_stats` of every sparse layer of `model`, by layer name."""
    return {
        name: mask_graph_stats(layer.weight_mask, layer.dense_weight() if weighted else None)
        for name, layer in sparse_layers(model).items()
    }


def mean_stats(per_layer: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over layers of the Ramanujan gap and of the weighted spectral gap (those present)."""
    out = {}
    for key in ("ramanujan_gap", "weighted_spectral_gap"):
        values = [s[key] for s in per_layer.values() if key in s]
        if values:
            out[key] = sum(values) / len(values)
    return out


__all__ = ["mask_graph_stats", "mean_stats", "model_spectral_stats", "top_singular_values"]
