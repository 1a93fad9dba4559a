"""The recipe's optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .config import OptimConfig


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases, norms and position/token embeddings are exempt, as in
    GPT-3 / Megatron). Fused on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "wte" not in name and "wpe" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, fused=fused)


def build_scheduler(optimizer, optim: OptimConfig, warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` x peak at the last step."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, min_lr_rate=optim.min_lr_ratio
    )
