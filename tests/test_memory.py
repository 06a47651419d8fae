"""duquant.utils.return_freed_memory: glibc's mmap threshold is set where glibc is there, else a
plain False (no error)."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

from duquant import utils

_FRAGMENTED = """
import sys, torch
from duquant.utils import return_freed_memory
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])
if sys.argv[1] == "1":
    assert return_freed_memory()
torch.ones(2 << 20)  # 8 MiB freed: glibc's dynamic threshold rises above 4 MiB
before = rss()
blocks, pins = [], []
for _ in range(16):
    blocks.append(torch.ones(1 << 20))  # 4 MiB, touched
    pins.append(torch.ones(16 << 10))  # 64 KiB kept: freed blocks cannot be trimmed off the top
del blocks
print(rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_blocks_go_back_to_the_system_after_the_call():
    """Freed 4 MiB tensors between live small ones: glibc keeps the 64 MiB by default, and gives
    it back once large allocations are mmap-served (each in a fresh process)."""
    kib = {}
    for mode in ("0", "1"):
        out = subprocess.run(
            [sys.executable, "-c", _FRAGMENTED, mode], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        kib[mode] = int(out.stdout.strip())
    assert kib["0"] > 48 * 1024, kib  # the default: kept
    assert kib["1"] < 8 * 1024, kib  # after the call: returned


def test_no_glibc_is_a_plain_false(monkeypatch):
    def no_libc(*_a, **_k):
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert utils.return_freed_memory() is False
