"""The native CPU kernel of condensed layers: built ahead of time, loaded when present, never compiled on load.

The C source is ``condensed_kernel.c`` (package data, next to this file). ``hf-sparse-ift build-kernels``
(`hf_sparse_ift.kernels.build`, outside this folder) compiles it once into the kernel cache; `load_kernel` only opens
a library there whose build record vouches for it (`native_kernels`: size, sha256, source hash, interface version):
loading a model, running a condensed layer or running this file as ``trust_remote_code`` never starts a compiler.
Without a usable library (or with ``HF_SPARSE_IFT_KERNEL=0``) condensed layers compute with torch, and a one-time
message says so.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

from transformers.utils import logging

from .native_kernels import (
    DISABLE_VARIABLE,
    build_record,
    disabled,
    kernel_threads,
    open_library,
    requested_threads,
    unusable,
)
from .native_kernels import library_path as cached_library_path

logger = logging.get_logger(__name__)

STEM = "condensed"
SOURCE = Path(__file__).with_name("condensed_kernel.c")
# Bumped whenever a function's signature in condensed_kernel.c changes; the library reports its own
# (`condensed_kernel_abi`) and a library of another version is not used.
KERNEL_ABI = 2
ABI_FUNCTION = "condensed_kernel_abi"

_VOID = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_VALUE_TYPES = ("f32", "bf16")
_INDEX_TYPES = ("i16", "i32")

_UNSET = object()
_library = _UNSET
_library_lock = threading.Lock()


def library_path() -> Path:
    """Where the build writes, and `load_kernel` looks for, this CPU's library."""
    return cached_library_path(STEM, KERNEL_ABI)


def declare(lib) -> None:
    """Argument and result types of the library's functions (ctypes passes them unchecked otherwise)."""
    for values in _VALUE_TYPES:
        for index in _INDEX_TYPES:
            gemv = getattr(lib, f"gemv_{values}_{index}")
            gemv.argtypes = [_VOID] * 7 + [_I64, _INT]
            gemv.restype = None
            for tile in (16, 64):
                spmm = getattr(lib, f"spmm{tile}_{values}_{index}")
                spmm.argtypes = [_VOID] * 7 + [_I64] * 4 + [_INT]
                spmm.restype = None
    lib.gemv_mask_f32.argtypes = [_VOID] * 7 + [_I64, _I64, _INT]
    lib.gemv_mask_f32.restype = None
    lib.gemv_mask_native.argtypes = []
    lib.gemv_mask_native.restype = _INT


def load_kernel():
    """The built kernel library, or None: disabled (``HF_SPARSE_IFT_KERNEL=0``), not built, damaged, or unusable.
    Never builds.

    Decided once per process, with one message saying which path condensed layers take."""
    global _library
    if _library is not _UNSET:
        return _library
    with _library_lock:
        if _library is not _UNSET:
            return _library
        path = library_path()
        lib = None
        requested_threads()  # a bad HF_SPARSE_IFT_KERNEL_THREADS is refused whether or not a library is built
        if disabled():
            logger.info(f"Condensed layers compute with torch ({DISABLE_VARIABLE}=0 turns the native kernel off).")
        elif (reason := unusable(path, SOURCE)) is not None:
            logger.warning(
                f"Condensed layers compute with torch: {reason}. On CPU that is slower than the kernel; build it "
                f"with `hf-sparse-ift build-kernels` (needs a C compiler)."
            )
        else:
            try:
                lib = open_library(path, ABI_FUNCTION, KERNEL_ABI, declare)
                logger.info(f"Condensed layers compute with the native kernel {path}.")
            except (OSError, AttributeError) as err:
                logger.warning(
                    f"Condensed layers compute with torch: the native kernel {path} cannot be used ({err}). "
                    f"Rebuild it with `hf-sparse-ift build-kernels`."
                )
        _library = lib
    return _library


def forget() -> None:
    """Decide afresh at the next `load_kernel` (after a build)."""
    global _library
    _library = _UNSET


def kernel_info() -> dict | None:
    """Where the kernel in use came from (path, compiler, flags, source and library hashes, build time) and the threads
    it runs on, or None without one."""
    if load_kernel() is None:
        return None
    path = library_path()
    return {"path": str(path), "threads": kernel_threads(path), **build_record(path)}
