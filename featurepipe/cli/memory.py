"""Process-wide memory settings the command line makes for itself (library code never does).

Arrow's default allocator (mimalloc in the pyarrow wheels) keeps freed memory for reuse. pandas 3
stores every string column in Arrow, so scanning 70,000 images (paths and hashes) left ~20 MB more
resident than the system allocator does, and that counts against the flat-memory target
(`features export`: 1,000 vs 70,000 images). The system allocator returns large blocks to the OS
when they are freed. Measured cost: none visible (Arrow's buffers here are few and large).
"""

from __future__ import annotations

import os
import sys

ARROW_POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"


def lean_arrow_allocator() -> None:
    """Use the system allocator for Arrow's default pool, unless the user chose a pool in the
    environment. Arrow reads the variable when the pool is first used; importing pandas may already
    have done that, so an imported pyarrow is switched explicitly (before any of our allocations)."""
    if ARROW_POOL_VARIABLE in os.environ:
        return
    os.environ[ARROW_POOL_VARIABLE] = "system"
    if "pyarrow" in sys.modules:
        import pyarrow

        pyarrow.set_memory_pool(pyarrow.system_memory_pool())


# glibc's mallopt parameter number for the mmap threshold (malloc.h); fixing it also switches off
# glibc's dynamic raising of the threshold.
_M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 1 << 20


def return_large_blocks() -> bool:
    """Make glibc serve every block of >= 1 MiB from its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold each time a mapped block is freed, so after the first few chunks
    a streaming writer's 5 MB buffers come from the heap, whose freed space stays resident and
    fragments: `features export .parquet` grew ~45 MB from 1,000 to 70,000 images that way, and
    ~5 MB with the threshold fixed. Only the export commands call this (their big blocks are few and
    each lives for one chunk); elsewhere glibc's adaptive behaviour is kept. False where the C
    library is not glibc (nothing is changed)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version   # glibc only: musl and others have a different allocator
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))
