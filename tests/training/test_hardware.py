"""What `training.hardware` does to the process: the C allocator setting of a CPU run (train.cpu_allocator)."""

import ctypes
import platform
import subprocess
import sys

import pytest

# Allocates 16 MiB through torch, frees it, and prints glibc's count of mmapped chunks the allocation added and the
# free bytes its heap holds after the free (mallinfo2), with the setting of argv[1] applied first.
SCRIPT = """
import ctypes, sys, torch
from hf_sparse_ift.training.hardware import apply_cpu_allocator
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
apply_cpu_allocator(sys.argv[1])
before = libc.mallinfo2().hblks
x = torch.ones(4 * 2**20)
mapped = libc.mallinfo2().hblks - before
del x
print(mapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="keep-freed tunes glibc's malloc (mallinfo2: glibc 2.33 and later)",
)
def test_keep_freed_serves_activations_from_the_heap_and_keeps_them_after_a_free():
    def run(setting):
        out = subprocess.run([sys.executable, "-c", SCRIPT, setting], capture_output=True, text=True, check=True)
        mapped, free = map(int, out.stdout.split())
        return mapped, free

    # glibc's defaults: 16 MiB is above the first mmap threshold (128 KiB), so it is mapped and unmapped on free
    mapped, _ = run("unchanged")
    assert mapped == 1
    # kept: it comes from the heap, and the heap still holds it, free for the next step, after the free
    mapped, free = run("keep-freed")
    assert mapped == 0 and free >= 16 * 2**20
