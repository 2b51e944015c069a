"""One process-wide malloc setting: every big block is a memory mapping of its own.

Why. glibc's malloc serves blocks of ``M_MMAP_THRESHOLD`` or more (128 KiB at start)
as mappings of their own, but each time such a block is freed it raises the threshold
to that block's size (up to 32 MiB). After the first big message, then, big buffers
live in the heap, and a buffer that grows (a client's message being read: the token so
far, its text, its packed values) is copied whole whenever ``realloc`` cannot extend it
in place, into pages never touched before. A first touch costs a page fault, ~2.5 us a
4 KiB page on a virtual machine: growing an 8 MiB buffer past its size held the loop
~5 ms in one turn, and every other client waited (README "Security").

With the threshold fixed, a big block stays a mapping: ``realloc`` moves it with
``mremap`` (no copy), its new pages are touched as they are written (a few a loop
turn), and ``free`` gives it back to the system at once, so memory a client's big
message used does not stay with the process after the client is gone.
"""

from __future__ import annotations

import ctypes
from typing import Final

# mallopt(3) parameter (malloc.h); setting it also turns off the dynamic adjustment.
_M_MMAP_THRESHOLD: Final = -3
# glibc's own starting value: blocks below it (messages, replies, read buffers) come
# from the heap as before; what is mapped is what a big message alone makes.
MMAP_THRESHOLD: Final = 128 * 1024


def map_big_blocks() -> bool:
    """Fix malloc's mmap threshold at MMAP_THRESHOLD for this process. False where the
    C library has no mallopt (not glibc), or refuses: then its defaults stay."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
