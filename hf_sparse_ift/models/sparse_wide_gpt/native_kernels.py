"""Loading the native CPU kernels: libraries built ahead of time, checked, then opened; nothing here compiles.

The kernels are C sources next to this file (``condensed_kernel.c``, ``block_sparse_kernel.c``, package data).
``hf-sparse-ift build-kernels`` (`hf_sparse_ift.kernels.build`, outside this folder, which is copied into every
checkpoint as remote code) compiles them into the kernel cache (``$HF_SPARSE_IFT_CACHE``, else
``~/.cache/hf_sparse_ift``, folder ``kernels``), one library per kernel under a name that says its interface version
and the CPU it was built for, with a JSON build record beside it: compiler, flags, source hash, and the size and
sha256 of the library itself.

`open_library` opens a library only if its record vouches for the file on disk: a library whose size or sha256
differs from its record (a truncated copy, a full disk, an interrupted build) is refused before the dynamic loader
maps it -- mapping a truncated library kills the process with SIGBUS at its first call, beyond any ``try``.

The kernels share their work out on the threads of the OpenMP runtime torch computes with (found among the process's
libraries), or on threads of their own where there is none or ``HF_SPARSE_IFT_KERNEL_THREADS=own`` asks for them
(``kernel_pool.h`` says when each is faster); `kernel_threads` says which a library uses.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

from .errors import UsageError

HERE = Path(__file__).resolve().parent
DISABLE_VARIABLE = "HF_SPARSE_IFT_KERNEL"
THREADS_VARIABLE = "HF_SPARSE_IFT_KERNEL_THREADS"
THREAD_CHOICES = ("openmp", "own")
OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")
HEADERS = ("kernel_pool.h",)  # included by every kernel source: part of what a library was built from


def cpu_identity() -> str:
    """What a ``-march=native`` binary depends on: the CPU model and its instruction-set flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("HF_SPARSE_IFT_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "hf_sparse_ift")
    return Path(root) / "kernels"


def library_path(stem: str, abi: int) -> Path:
    """Where the build writes, and the loader looks for, kernel `stem`'s library for this CPU."""
    cpu = hashlib.sha256(cpu_identity().encode()).hexdigest()[:16]
    return cache_dir() / f"{stem}-abi{abi}-{platform.machine()}-{cpu}.so"


def disabled() -> bool:
    """``HF_SPARSE_IFT_KERNEL=0`` (or false/no/off) turns every native kernel off."""
    return os.environ.get(DISABLE_VARIABLE, "1").lower() in ("0", "false", "no", "off")


def build_record(path: Path) -> dict:
    record = path.with_suffix(".json")
    try:
        return json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_sha256(source: Path) -> str:
    """The hash a build record keeps of what the library was built from: the source and the shared headers."""
    digest = hashlib.sha256(source.read_bytes())
    for header in HEADERS:
        if (source.parent / header).is_file():
            digest.update((source.parent / header).read_bytes())
    return digest.hexdigest()


def unusable(path: Path, source: Path) -> str | None:
    """Why the library at `path` must not be opened, or None: missing, no build record, not the file its record
    describes (size, sha256), or built from another version of `source` (checked when the source is here; remote
    code has none, and the interface version still guards it)."""
    if not path.is_file():
        return f"no built native kernel at {path}"
    record = build_record(path)
    if "library_sha256" not in record or "library_bytes" not in record:
        return f"{path} has no build record with its size and sha256 ({path.with_suffix('.json').name})"
    size = path.stat().st_size
    if size != record["library_bytes"]:
        return f"{path} is {size} bytes, its build record says {record['library_bytes']} (damaged or truncated)"
    if file_sha256(path) != record["library_sha256"]:
        return f"{path} does not match the sha256 in its build record (damaged)"
    if source.is_file() and record.get("source_sha256") != source_sha256(source):
        return f"{path} was built from another version of {source.name}"
    return None


def loaded_library(name: str) -> str | None:
    """The path of a shared library of this process whose file name starts with `name`, or None (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if path.startswith("/") and Path(path).name.startswith(name):
                    return path
    except OSError:
        pass
    return None


def openmp_parallel_entry() -> tuple[str, int] | None:
    """(path, address of GOMP_parallel) of the OpenMP runtime torch's CPU ops run on, or None."""
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    for name in OPENMP_RUNTIMES:
        path = loaded_library(name)
        if path:
            try:
                return path, ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value
            except (OSError, AttributeError):
                continue
    return None


def requested_threads() -> str:
    """``HF_SPARSE_IFT_KERNEL_THREADS``: "openmp" (default) or "own"; anything else is refused (UsageError)."""
    value = os.environ.get(THREADS_VARIABLE, "openmp").strip().lower()
    if value not in THREAD_CHOICES:
        raise UsageError(f"{THREADS_VARIABLE}={value!r} is invalid: expected one of {list(THREAD_CHOICES)}")
    return value


_threads_of: dict[str, str] = {}


def kernel_threads(path: Path) -> str | None:
    """Which threads the opened library at `path` shares its work on: "openmp <runtime path>" or "own"."""
    return _threads_of.get(str(path))


def open_library(path: Path, abi_function: str, abi: int, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """Open the library (its record checked by the caller), check its interface version, declare its functions and
    start its pool: on torch's OpenMP threads where found (unless ``HF_SPARSE_IFT_KERNEL_THREADS=own``), else its
    own. Raises OSError or AttributeError when it cannot be used, UsageError for a bad thread setting."""
    threads = requested_threads()
    lib = ctypes.CDLL(str(path))
    getattr(lib, abi_function).restype = ctypes.c_int
    found = getattr(lib, abi_function)()
    if found != abi:
        raise OSError(f"{path} implements kernel interface {found}, this code needs {abi}")
    declare(lib)
    lib.pool_init.argtypes = []
    lib.pool_init.restype = None
    lib.pool_init()
    openmp = openmp_parallel_entry() if threads == "openmp" else None
    lib.pool_use_openmp.argtypes = [ctypes.c_void_p]
    lib.pool_use_openmp.restype = None
    lib.pool_use_openmp(None if openmp is None else openmp[1])
    _threads_of[str(path)] = "own" if openmp is None else f"openmp {openmp[0]}"
    return lib
