"""qmpmux.allocator: a buffer growing to megabytes is never copied whole in one step."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A fresh interpreter (the setting is process-wide, and what it fixes depends on what the
# process freed before): free one big block, as after a client's first big message, then
# grow a buffer 64 KiB at a time to 16 MiB, as a message being read grows, while other
# blocks are made after it (so it cannot simply grow in place); print the most pages first
# touched by one step.
_GROW = """
import resource, sys
from qmpmux import allocator
if sys.argv[1] == "mapped":
    assert allocator.map_big_blocks()
del bytearray(16 << 20)[:]
buffer, others, most = bytearray(), [], 0
for _ in range(256):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer += bytes(64 << 10)
    others.append(bytes(4096))
    most = max(most, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(most)
"""


def _most_faults_a_step(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _GROW, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout)


@pytest.mark.timeout(120)
def test_a_growing_buffer_touches_only_what_each_step_adds() -> None:
    # 64 KiB a step is 16 pages, bytes(64 KiB) 16 more, and the one step that moves the
    # buffer from the heap to a mapping copies up to MMAP_THRESHOLD (32 pages); a whole
    # copy of the buffer later would be hundreds to thousands.
    assert _most_faults_a_step("mapped") <= 128
    # Without the setting the same process copies the whole buffer in some step: what the
    # test above would catch if map_big_blocks stopped taking effect.
    assert _most_faults_a_step("default") >= 1000
