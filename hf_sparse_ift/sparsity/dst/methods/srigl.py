"""SRigL (Lasby et al. 2024): RigL with a constant fan-in per output neuron and neuron ablation, so the
sparsity can be condensed into small dense matrices ([out, fan_in] values and indices)."""

from __future__ import annotations

import torch

from ...masks import SparseLinear, derive_seed, select_top_k
from .base import DSTMethod, LayerUpdate


class SRigL(DSTMethod):
    name = "srigl"
    needs_dense_grad = True

    def initial_mask(self, layer: SparseLinear, index: int) -> torch.Tensor | None:
        """Constant fan-in f = round(density·d_in) on every output neuron. Masks that already have a constant
        fan-in (a model that trained with SRigL before) are kept."""
        d_out, d_in = layer.weight.shape
        fan_ins = layer.weight_mask.sum(dim=1)
        alive = fan_ins[fan_ins > 0]
        if alive.numel() and (alive == alive[0]).all():
            return None
        fan_in = max(1, round((1 - layer.sparsity) * d_in))
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, index))
        columns = torch.rand(d_out, d_in, generator=generator).argsort(dim=1)[:, :fan_in]
        mask = torch.zeros(d_out, d_in, dtype=torch.bool)
        mask.scatter_(1, columns, True)
        return mask.to(layer.weight_mask.device)

    def new_mask(self, update: LayerUpdate, drop_fraction: float) -> tuple[torch.Tensor, dict]:
        mask = update.layer.weight_mask
        weight = update.weight.abs().float()
        grad = update.dense_grad().abs().float()
        d_out, d_in = mask.shape
        active_rows = mask.any(dim=1)
        n_active = int(mask.sum())
        fan_in = n_active // max(int(active_rows.sum()), 1)
        k = min(round(drop_fraction * n_active), n_active)
        inf = torch.tensor(float("inf"), device=weight.device)
        # Saliency as unstructured RigL would decide it: keep all but the k smallest |w|, regrow the k
        # largest |∇w| among inactive positions.
        kept = mask & ~select_top_k(torch.where(mask, weight, inf).view(-1), k, largest=False).view_as(mask)
        grow = select_top_k(torch.where(mask, -inf, grad).view(-1), k, largest=True).view_as(mask)
        salient = (kept | grow).sum(dim=1)
        # Neuron ablation: an active neuron with too few salient weights is removed.
        alive = active_rows & (salient >= self.config.ablation_threshold * fan_in)
        # Never ablate below what the budget needs at full fan-in; then the most salient neurons stay.
        min_alive = min(int(active_rows.sum()), -(-update.budget // d_in))
        if int(alive.sum()) < min_alive:
            rank = torch.where(active_rows, salient * (d_out + 1) - torch.arange(d_out, device=salient.device), -1)
            alive = torch.zeros_like(active_rows)
            alive[rank.topk(min_alive).indices] = True
        new_fan_in = min(d_in, update.budget // int(alive.sum()))
        # Per neuron: all kept weights first, then the largest gradients among positions inactive before.
        score = torch.where(kept, inf, torch.where(mask, -inf, grad))
        columns = score.topk(new_fan_in, dim=1).indices
        new = torch.zeros_like(mask)
        new.scatter_(1, columns, True)
        new &= alive.unsqueeze(1)
        active_neurons = int(alive.sum())
        stats = {
            "dropped": int((mask & ~new).sum()),
            "grown": int((new & ~mask).sum()),
            "active_neurons": active_neurons,
            "fan_in": new_fan_in,
            "active": new_fan_in * active_neurons,
        }
        return new, stats
