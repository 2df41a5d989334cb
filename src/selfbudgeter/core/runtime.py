"""Process-wide settings made once at the start of the `selfbudgeter` command, before any model work.

glibc's allocator serves a request above its mmap threshold (128 KiB at first, raised as such blocks are
freed) with a fresh `mmap`, and gives memory at the top of the heap back to the system past its trim
threshold (128 KiB). A decode step allocates and frees tensors of a few MB (a `DynamicCache` grows K/V with
`torch.cat`; attention scores, activations), so each step pays for new pages: half a decode step of the
embedded model on CPU was page faults (2.8 M minor faults for a 250-step batch of 64). Raising both
thresholds keeps those blocks in the heap and reuses them. Measured on 2 CPU cores: docs/speed.md.

`mallopt` and not the `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` environment variables: glibc reads
those only when the process starts, so the command would have to re-execute itself, and both routes set the
same two parameters (measured the same: docs/speed.md). Thresholds set by the user in the environment (or by
`GLIBC_TUNABLES`) are left alone; on another C library this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Above a decode step's blocks (the embedded model's K or V for a batch of 64 at 466 positions: 23 MB); glibc
# versions refuse more than 32 MiB (HEAP_MAX_SIZE / 2). Larger blocks are still mapped, once per batch, not per step.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Memory freed at the top of the heap is kept up to this much: a decode step's working set, many times over.
TRIM_THRESHOLD = 1024 * 1024 * 1024

_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _user_set() -> bool:
    return any(name in os.environ for name in _ENVIRONMENT) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when both were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or _user_set():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on a value glibc refuses.
    done = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) & bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    if not done:
        logger.debug("mallopt refused mmap threshold %d / trim threshold %d", mmap_threshold, trim_threshold)
    return done
