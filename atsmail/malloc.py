"""Large buffers go back to the operating system as soon as they are freed.

glibc serves an allocation above its mmap threshold (128 KiB to start with)
from a mapping of its own, unmapped on free; but each time such a block is
freed it raises the threshold to that block's size, up to 32 MiB. After one
30 MB message every buffer of a later one comes from the heap, which glibc
rarely gives back: the relay would keep the peak of its largest message for
good. Setting the threshold fixes it (and turns the adjustment off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # malloc.h
MMAP_THRESHOLD = 256 * 1024


def keep_large_buffers_unmapped() -> bool:
    """Fix glibc's mmap threshold; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not ok:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused")
    return ok
