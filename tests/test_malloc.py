"""The CLI pins glibc's mmap threshold (gradosr.cli.fix_mmap_threshold), so that freed
batch-sized blocks go back to the system instead of fragmenting the heap (issue 20)."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
import numpy as np
from gradosr.cli import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 1024
big = np.ones(64 << 17)  # 64 MB mapped and freed: glibc would now raise its threshold to 64 MB
del big
base = rss()
keep = []
for i in range(200):  # 1 MB blocks, freed, with a small long-lived object after each
    block = np.ones(1 << 17)
    keep.append(np.ones(4))
    del block
    block = np.ones(1 << 17) * 2
    keep.append(block[:1].copy())
    del block
print(rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_pinned_mmap_threshold_returns_freed_blocks():
    def grown(mode):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert grown("fixed") < 20  # every 1 MB block was mapped and unmapped
