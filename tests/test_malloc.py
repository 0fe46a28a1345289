"""The CLI pins glibc's mmap threshold (gradosr.cli.fix_mmap_threshold), so that freed
batch-sized blocks go back to the system instead of fragmenting the heap (issue 20).

Checked on glibc's own count of mapped blocks (``mallinfo2().hblks``): after a 16 MB
mapped block is freed, glibc's dynamic threshold serves a 1 MB block from the heap;
with the threshold pinned, the 1 MB block is mapped."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, ctypes.util, sys
import numpy as np
from gradosr.cli import fix_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "pinned":
    assert fix_mmap_threshold()
big = np.ones(16 << 17)  # 16 MB, mapped; freeing it raises glibc's dynamic threshold to 16 MB
del big
before = libc.mallinfo2().hblks
block = np.ones(1 << 17)  # 1 MB
print(libc.mallinfo2().hblks - before)
"""


def mapped_blocks_added(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_pinned_mmap_threshold_maps_batch_sized_blocks():
    assert mapped_blocks_added("dynamic") == 0  # glibc's default: the 1 MB block comes from the heap
    assert mapped_blocks_added("pinned") == 1
