"""pvq.memory: the allocator setting that keeps a long run's resident set from growing."""
import platform
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, sys
import torch

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "mapped":
    from pvq.memory import map_large_buffers
    map_large_buffers()
freed = torch.empty(8 << 20, dtype=torch.uint8)  # glibc's own threshold rises to this size once it is freed
del freed
before = libc.mallinfo2().hblkhd  # bytes in chunks mapped on their own
kept = torch.empty(3 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator setting")
def test_a_large_buffer_is_mapped_on_its_own_after_a_larger_one_was_freed():
    def mapped_bytes(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    assert mapped_bytes("default") == 0  # the heap's: glibc's threshold had risen past it
    assert mapped_bytes("mapped") >= 3 << 20
