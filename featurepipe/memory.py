"""Process-wide memory settings the command line makes for itself (library code never does).

Arrow's default allocator (mimalloc in the pyarrow wheels) keeps freed memory for reuse. pandas 3
stores every string column in Arrow, so scanning 70,000 images (paths and hashes) left ~20 MB more
resident than the system allocator does, and that counts against the flat-memory target of issue
14 (`features export`: 1,000 vs 70,000 images). The system allocator returns large blocks to the OS
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
