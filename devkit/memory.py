"""A process's memory as the benchmarks report it: the peak resident set (VmHWM) and the current one.

VmHWM is this process image's own high-water mark. ``ru_maxrss``, the fallback where there is no
/proc (macOS), also holds the parent's RSS at the fork (Linux keeps it across exec), so a worker of
a large parent would report the parent's size; and only VmHWM can be reset.
"""

from __future__ import annotations

import os
import resource
import sys

MIB = 2**20


def peak_rss_bytes() -> int:
    """Peak RSS of this process in bytes: VmHWM, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return maxrss_bytes()


def maxrss_bytes() -> int:
    """``ru_maxrss`` in bytes (see the module for how it differs from VmHWM)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: ``/proc/self/clear_refs``); False where the kernel refuses,
    and then ``peak_rss_bytes`` keeps counting from the process's start."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """RSS of this process now, in bytes (Linux: /proc/self/statm; elsewhere the peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()
