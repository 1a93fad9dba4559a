"""Building the native CPU kernels: what ``hf-sparse-ift build-kernels`` runs, and the only code that starts a compiler.

It lives outside the model folder (``models/sparse_wide_gpt/``), which is copied into every checkpoint as remote code:
that folder only opens libraries built here (`native_kernels`). Each kernel (`KERNELS`) is compiled from its C source
with the system C compiler (``CC``, else ``cc``, ``gcc`` or ``clang``), trying the CPU's own instructions first, then
portable code, and opened once to check that this machine runs it. The library goes into the kernel cache atomically
(a temporary file, then a rename) with its build record: compiler, flags, source hash, build time, interface version,
and the library's size and sha256, which the loader checks before it maps the file.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

from ..errors import UsageError

# Tried in order: the CPU's own instructions (AVX2/FMA, AVX-512 where it has them), then portable code.
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
COMMON_FLAGS = ["-pthread", "-std=gnu11", "-ffp-contract=fast", "-shared", "-fPIC"]


def kernels() -> dict[str, ModuleType]:
    """Name -> the module that loads it (``STEM``, ``SOURCE``, ``KERNEL_ABI``, ``ABI_FUNCTION``, ``declare``,
    ``forget``)."""
    from ..models.sparse_wide_gpt import block_sparse_cpu, condensed_kernel

    return {module.STEM: module for module in (condensed_kernel, block_sparse_cpu)}


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not found:
        raise RuntimeError("no C compiler found: install one (cc, gcc or clang) or name it in the CC variable")
    return found


def build_kernel(kernel: ModuleType) -> dict:
    """Compile one kernel into its `library_path` and write its build record; returns the record with the path."""
    from ..models.sparse_wide_gpt import native_kernels

    cc = compiler()
    target = native_kernels.library_path(kernel.STEM, kernel.KERNEL_ABI)
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [cc, *flags, *COMMON_FLAGS, str(kernel.SOURCE), "-o", str(built)]
            try:
                subprocess.run(command, check=True, capture_output=True, timeout=300)
                native_kernels.open_library(built, kernel.ABI_FUNCTION, kernel.KERNEL_ABI, kernel.declare)
            except (OSError, AttributeError, subprocess.SubprocessError) as err:
                stderr = getattr(err, "stderr", None)
                errors.append(f"{' '.join(flags)}: {stderr.decode(errors='replace') if stderr else err}")
                continue
            record = {
                "compiler": cc,
                "flags": [*flags, *COMMON_FLAGS],
                "source_sha256": native_kernels.source_sha256(kernel.SOURCE),
                "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "abi": kernel.KERNEL_ABI,
                "library_bytes": built.stat().st_size,
                "library_sha256": native_kernels.file_sha256(built),
            }
            # the library first, then its record: a crash in between leaves a library its old record refuses
            os.replace(built, target)
            record_tmp = Path(tmp) / "record.json"
            record_tmp.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(record_tmp, target.with_suffix(".json"))
        kernel.forget()  # the next load finds the new library
        return {"path": str(target), **record}
    raise RuntimeError(f"could not compile the {kernel.STEM} kernel: " + "; ".join(errors))


def build_kernels(names: list[str] | None = None) -> list[dict]:
    """Build the named kernels (default: all), each with its record; stops at the first that fails."""
    available = kernels()
    for name in names or []:
        if name not in available:
            raise UsageError(f"kernel {name!r} is not one of {sorted(available)}")
    return [build_kernel(available[name]) for name in (names or list(available))]
