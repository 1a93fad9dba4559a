"""The optimizer of the recipe and accelerator peaks for MFU (shared by the trainer and the benchmarks)."""

from __future__ import annotations

import torch

from .config import OptimConfig

# Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_flops(setting="auto") -> float | None:
    """FLOP/s for MFU: an explicit TFLOP/s number, or the peak of a known GPU ("auto"), else None."""
    if setting not in ("auto", None):
        return float(setting) * 1e12
    if setting is None or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


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


SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def set_sdpa_backend(choice: str = "auto") -> None:
    """Restrict PyTorch's scaled-dot-product attention to one kernel family (process-wide, CUDA only).

    "auto" leaves PyTorch's own priority order (cuDNN first on Hopper in recent releases).
    """
    if choice not in SDPA_BACKENDS:
        raise ValueError(f"train.attention_backend={choice!r} is invalid: expected one of {list(SDPA_BACKENDS)}")
    if not torch.cuda.is_available():
        return
    enable = {name: choice in ("auto", name) for name in SDPA_BACKENDS[1:]}
    torch.backends.cuda.enable_flash_sdp(enable["flash"])
    torch.backends.cuda.enable_cudnn_sdp(enable["cudnn"])
    torch.backends.cuda.enable_mem_efficient_sdp(enable["efficient"])
    torch.backends.cuda.enable_math_sdp(enable["math"] or choice == "auto")
