"""The native CPU kernel of condensed layers: built ahead of time, loaded when present, never compiled on load.

The C source is ``condensed_kernel.c`` (package data, next to this file). ``hf-sparse-ift build-kernels`` calls
`build_kernel`, which compiles it once with the system C compiler into the kernel cache (``$HF_SPARSE_IFT_CACHE``, else
``~/.cache/hf_sparse_ift``, folder ``kernels``) under a name that says the interface version and the CPU it was built
for, with a JSON file beside it recording the compiler, flags and source hash. `load_kernel` only looks there: loading
a model, running a condensed layer or running this file as ``trust_remote_code`` never starts a compiler. Without a
built library (or with ``HF_SPARSE_IFT_KERNEL=0``) condensed layers compute with torch, and a one-time message says so.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

SOURCE = Path(__file__).with_name("condensed_kernel.c")
# Bumped whenever a function's signature in condensed_kernel.c changes; the library reports its own
# (`condensed_kernel_abi`) and a library of another version is not used.
KERNEL_ABI = 1
DISABLE_VARIABLE = "HF_SPARSE_IFT_KERNEL"
# Tried in order: the CPU's own instructions (AVX2/FMA where it has them), then portable code.
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
COMMON_FLAGS = ["-pthread", "-std=gnu11", "-ffp-contract=fast", "-shared", "-fPIC"]

_VOID = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_VALUE_TYPES = ("f32", "bf16")
_INDEX_TYPES = ("i16", "i32")

_UNSET = object()
_library = _UNSET
_library_lock = threading.Lock()


def _cpu_identity() -> str:
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


def library_path() -> Path:
    """Where `build_kernel` writes, and `load_kernel` looks for, this CPU's library."""
    cpu = hashlib.sha256(_cpu_identity().encode()).hexdigest()[:16]
    return cache_dir() / f"condensed-abi{KERNEL_ABI}-{platform.machine()}-{cpu}.so"


def _disabled() -> bool:
    return os.environ.get(DISABLE_VARIABLE, "1").lower() in ("0", "false", "no", "off")


def _declare(lib) -> None:
    """Argument and result types of the library's functions (ctypes passes them unchecked otherwise)."""
    lib.pool_init.argtypes = []
    lib.pool_init.restype = None
    for values in _VALUE_TYPES:
        for index in _INDEX_TYPES:
            gemv = getattr(lib, f"gemv_{values}_{index}")
            gemv.argtypes = [_VOID] * 7 + [_I64, _INT]
            gemv.restype = None
            for tile in (16, 64):
                spmm = getattr(lib, f"spmm{tile}_{values}_{index}")
                spmm.argtypes = [_VOID] * 7 + [_I64] * 4 + [_INT]
                spmm.restype = None


def _open(path: Path):
    lib = ctypes.CDLL(str(path))
    lib.condensed_kernel_abi.restype = _INT
    abi = lib.condensed_kernel_abi()
    if abi != KERNEL_ABI:
        raise OSError(f"{path} implements kernel interface {abi}, this code needs {KERNEL_ABI}")
    _declare(lib)
    lib.pool_init()
    return lib


def load_kernel():
    """The built kernel library, or None: disabled (``HF_SPARSE_IFT_KERNEL=0``), not built, or unusable. Never builds.

    Decided once per process, with one message saying which path condensed layers take."""
    global _library
    if _library is not _UNSET:
        return _library
    with _library_lock:
        if _library is not _UNSET:
            return _library
        path = library_path()
        if _disabled():
            logger.info(f"Condensed layers compute with torch ({DISABLE_VARIABLE}=0 turns the native kernel off).")
            lib = None
        elif not path.is_file():
            logger.warning(
                f"Condensed layers compute with torch: no built native kernel at {path}. On CPU that is slower than the "
                f"kernel; build it once with `hf-sparse-ift build-kernels` (needs a C compiler)."
            )
            lib = None
        elif _stale(path):
            logger.warning(
                f"Condensed layers compute with torch: the native kernel {path} was built from another version of "
                f"condensed_kernel.c. Rebuild it with `hf-sparse-ift build-kernels`."
            )
            lib = None
        else:
            try:
                lib = _open(path)
                logger.info(f"Condensed layers compute with the native kernel {path}.")
            except (OSError, AttributeError) as err:
                logger.warning(
                    f"Condensed layers compute with torch: the native kernel {path} cannot be used ({err}). "
                    f"Rebuild it with `hf-sparse-ift build-kernels`."
                )
                lib = None
        _library = lib
    return _library


def _build_record(path: Path) -> dict:
    record = path.with_suffix(".json")
    return json.loads(record.read_text()) if record.is_file() else {}


def _stale(path: Path) -> bool:
    """Whether the library was built from a source other than the ``condensed_kernel.c`` beside this file (remote code
    has no source file to compare with; the interface version still guards it)."""
    if not SOURCE.is_file():
        return False
    return _build_record(path).get("source_sha256") != hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def kernel_info() -> dict | None:
    """Where the kernel in use came from (path, compiler, flags, source hash, build time), or None without one."""
    if load_kernel() is None:
        return None
    path = library_path()
    return {"path": str(path), **_build_record(path)}


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler found: install one (cc, gcc or clang) or name it in the CC variable")
    return compiler


def build_kernel() -> dict:
    """Compile ``condensed_kernel.c`` for this CPU into `library_path` (atomically: a temporary file, then a rename)
    and record how. Returns the record. The explicit build step: nothing else in the package calls it."""
    compiler = _compiler()
    target = library_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, *flags, *COMMON_FLAGS, str(SOURCE), "-o", str(built)]
            try:
                subprocess.run(command, check=True, capture_output=True, timeout=300)
                _open(built)  # refuse a library this machine cannot run
            except (OSError, subprocess.SubprocessError) as err:
                stderr = getattr(err, "stderr", None)
                errors.append(f"{' '.join(flags)}: {stderr.decode(errors='replace') if stderr else err}")
                continue
            os.replace(built, target)
        record = {
            "compiler": compiler,
            "flags": [*flags, *COMMON_FLAGS],
            "source_sha256": hashlib.sha256(source).hexdigest(),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "abi": KERNEL_ABI,
        }
        target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        global _library
        _library = _UNSET  # the next `load_kernel` finds the new library
        return {"path": str(target), **record}
    raise RuntimeError("could not compile the condensed kernel: " + "; ".join(errors))
