"""Facts about the machine a run uses: accelerator peaks for MFU, SDPA kernel families, precision, block-sparse
kernels, memory, the C allocator of a CPU run.

The constants are read by config validation and the CLI's help, which run without torch: each function imports it."""

from __future__ import annotations

import os
import platform

from ..errors import UsageError

# Dense bf16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
MIXED_PRECISION = ("auto", "bf16", "fp16", "no")

# The C allocator of a run that trains on CPU (train.cpu_allocator). With glibc's defaults, malloc raises its mmap
# threshold as buffers are freed (up to 32 MiB) and gives the top of the heap back to the system once more than twice
# that is free, so a step after one that freed its activations may fault their pages in again: 16,000-55,000 page
# faults in a SW-75 block step on a 2-core AMD EPYC, which then took 1.80-1.88x the dense step against 1.47-1.64x
# with freed memory kept (benchmarks/block_sparse.py, 2026-12-04). "keep-freed" keeps it for reuse, as jemalloc and
# tcmalloc do; "unchanged" leaves the process's allocator as it is.
CPU_ALLOCATORS = ("auto", "keep-freed", "unchanged")
MALLOPT_PARAMETERS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}  # their numbers in glibc's malloc.h
KEEP_FREED = {"M_TRIM_THRESHOLD": 2**31 - 1, "M_MMAP_THRESHOLD": 32 * 2**20}  # 32 MiB: glibc's largest threshold
# Environment variables that set the C allocator: "auto" leaves a process started with one of them as it is.
ALLOCATOR_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


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


def resolve_cpu_allocator(setting: str, on_gpu: bool) -> tuple[str, str | None]:
    """The `CPU_ALLOCATORS` setting a run applies, and the sentence for its records when "auto" decided it.

    "auto" keeps freed memory when the run trains on CPU with glibc's malloc, as the process started; it leaves the
    allocator unchanged on a GPU (host memory is not what a step allocates there), without glibc, and when the
    environment already tunes or replaces malloc (`ALLOCATOR_ENVIRONMENT`, a malloc in LD_PRELOAD, glibc.malloc
    tunables). "keep-freed" where glibc's malloc is not the allocator is refused now, before any work."""
    glibc = platform.libc_ver()[0] == "glibc"
    if setting == "keep-freed" and not glibc:
        raise UsageError(
            f"train.cpu_allocator='keep-freed' is invalid here: it tunes glibc's malloc, and this Python runs on "
            f"{platform.libc_ver()[0] or platform.system()}; choose 'unchanged' or 'auto'"
        )
    if setting != "auto":
        return setting, None
    tuned = [name for name in ALLOCATOR_ENVIRONMENT if name in os.environ]
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        tuned.append(f"LD_PRELOAD={os.environ['LD_PRELOAD']}")
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        tuned.append(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}")
    if on_gpu:
        why = "the run trains on a GPU"
    elif not glibc:
        why = f"the C library is {platform.libc_ver()[0] or platform.system()}, not glibc"
    elif tuned:
        why = f"the environment sets the allocator ({', '.join(tuned)})"
    else:
        parameters = ", ".join(f"{name}={value}" for name, value in KEEP_FREED.items())
        return "keep-freed", (
            f"train.cpu_allocator=auto: keep-freed (glibc mallopt {parameters}): freed activations stay in the heap "
            "for the next step instead of going back to the system and being faulted in again"
        )
    return "unchanged", f"train.cpu_allocator=auto: unchanged, because {why}"


def apply_cpu_allocator(setting: str) -> None:
    """Apply a resolved `CPU_ALLOCATORS` setting to this process's C allocator; "unchanged" does nothing. Its effect
    lasts for the process."""
    if setting != "keep-freed":
        return
    import ctypes

    libc = ctypes.CDLL(None)
    for name, value in KEEP_FREED.items():
        if libc.mallopt(MALLOPT_PARAMETERS[name], value) != 1:
            raise RuntimeError(f"train.cpu_allocator=keep-freed: glibc refused mallopt({name}, {value})")


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
