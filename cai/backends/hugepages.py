"""Memory for the buffers a CPU decode step streams through every step, on 2 MB pages.

A batch-16 decode step of the default model reads ~100 MB of packed weights and about as much
KV cache. On 4 KB pages that is ~50,000 pages a step, each a TLB miss and a page-table walk
(costly under a hypervisor's nested paging), and the walks also push out the entries the Python
and torch code between steps needs, so each of the step's small operations starts cold. Linux
backs an anonymous mapping with transparent 2 MB pages when it is asked to (madvise
MADV_HUGEPAGE; most distributions' default THP mode is "madvise"): measured on this project's
2-core VM, a batch-16 step took 30-40% less time (bench/RESULTS-roofline.md).

``empty(nbytes)`` hands out such memory as a numpy byte array (the mapping is freed with the
last array that uses it). Where the system cannot (no THP, not Linux), it is ordinary memory and
everything works the same, only slower; ``CAI_HUGEPAGES=0`` asks for ordinary pages.
"""

from __future__ import annotations

import math
import mmap
import os

HUGE = 2 << 20


def empty(nbytes: int):
    """A 2 MB-aligned, uninitialised numpy uint8 array of ``nbytes`` bytes, asked to live on
    transparent huge pages. Pages are only committed when first written."""
    import numpy as np

    size = -(-max(nbytes, 1) // HUGE) * HUGE
    # private: a shared anonymous mapping is shmem, which THP leaves alone by default
    mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # room to align
    advise = getattr(mm, "madvise", None)
    if advise is not None and hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("CAI_HUGEPAGES", "1") != "0":
        try:
            advise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP off or not supported: ordinary pages
            pass
    base = np.frombuffer(mm, dtype=np.uint8)
    skip = (-base.ctypes.data) % HUGE
    return base[skip : skip + nbytes]


def torch_empty(shape, dtype):
    """A contiguous CPU tensor on huge pages."""
    import torch

    return torch.from_numpy(empty(math.prod(shape) * dtype.itemsize)).view(dtype).view(tuple(shape))
