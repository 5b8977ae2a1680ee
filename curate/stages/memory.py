"""Give the heap memory a batch freed back to the operating system.

glibc's malloc keeps freed pages for reuse. Batches differ in shape (image sizes, text
lengths, captions that stop early), so the freed blocks rarely fit the next request
and a long-lived worker creeps up towards the sum of its largest batches: on a 640-sample
run the scoring actor held ~150 MB more than on 64 samples. ``malloc_trim(0)`` after
each batch returns what is free (a few milliseconds), so a worker's memory depends on
its models and one batch, not on how many batches it has seen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # glibc only (not musl)


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; False where the C library cannot (not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
