"""Facts about the machine a run uses: accelerator peaks for MFU, SDPA kernel families, precision, block-sparse
kernels, memory.

The constants are read by config validation and the CLI's help, which run without torch: each function imports it."""

from __future__ import annotations

import os

from ..errors import UsageError

# Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")


def peak_flops(setting="auto") -> float | None:
    """FLOP/s for MFU: an explicit TFLOP/s number, or the peak of a known GPU ("auto"), else None."""
    import torch

    if setting not in ("auto", None):
        return float(setting) * 1e12
    if setting is None or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def set_sdpa_backend(choice: str = "auto") -> None:
    """Restrict PyTorch's scaled-dot-product attention to one kernel family (process-wide, CUDA only).

    "auto" leaves PyTorch's own priority order (cuDNN first on Hopper in recent releases).
    """
    import torch

    if choice not in ATTENTION_BACKENDS:
        raise UsageError(f"train.attention_backend={choice!r} is invalid: expected one of {list(ATTENTION_BACKENDS)}")
    if not torch.cuda.is_available():
        return
    enable = {name: choice in ("auto", name) for name in ATTENTION_BACKENDS[1:]}
    torch.backends.cuda.enable_flash_sdp(enable["flash"])
    torch.backends.cuda.enable_cudnn_sdp(enable["cudnn"])
    torch.backends.cuda.enable_mem_efficient_sdp(enable["efficient"])
    torch.backends.cuda.enable_math_sdp(enable["math"] or choice == "auto")


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` -> bf16 on a GPU that has it, else fp32 ("no"). fp16 without a GPU is refused: accelerate then
    applies no autocast and no loss scaling, so the run would be fp32 recorded as fp16 (the Trainer refuses it too);
    bf16 on CPU is real (torch's CPU autocast)."""
    import torch

    if setting == "fp16" and not torch.cuda.is_available():
        raise UsageError(
            "train.mixed_precision='fp16' is invalid on this machine: fp16 mixed precision needs a CUDA GPU, and "
            "without one accelerate would silently train in fp32; on CPU choose 'bf16' (CPU autocast), 'no' "
            "(fp32) or 'auto'"
        )
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def resolve_block_kernel(model, precision: str) -> dict[str, str] | None:
    """The kernel a block-sparse model's layers compute with on the device this run trains on, by device type
    (``{"cuda": "triton"}``); None for a model without block layers. ``model.block_kernel`` "auto" picks by device
    (`block_sparse.resolve_kernel`); a named kernel that cannot compute here is refused now, before any work."""
    if not model.uses_blocks:
        return None
    import torch

    from ..models.sparse_wide_gpt.block_sparse import resolve_kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return {device: resolve_kernel(model.block_kernel, device, model.block_shape, dtype)}


def available_memory_bytes() -> tuple[int, str]:
    """Memory a run may use and where it is: free GPU memory, else the host's available RAM."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"free memory of {torch.cuda.get_device_name()}"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"], "available host memory (/proc/meminfo MemAvailable)"
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, "available host memory"
