"""Shared memory for large results going from a rank to the host.

One arena per rank: an anonymous `memfd` the host creates before starting the rank and hands over by inheritance
(no name in /dev/shm, so nothing can leak: the kernel frees it when both processes have closed it, even after a
SIGKILL). The rank copies a large result tensor into it once; the frame on the socket carries only its offset; the
host maps the same pages and builds a tensor *view* on them, so the caller's own copy (torch.cat) is the only copy
on the host. Measured reason: through the socket a 50 MB image batch moved at 0.04× memcpy (docs/PERFORMANCE.md).

Views are valid until the rank's next reply, which may reuse the space: the host copies what it keeps before it
sends the next call (Sidecar.call documents this).
"""

from __future__ import annotations

import mmap
import os

ALIGN = 64  # tensors start on a cache line, and any dtype's alignment divides it


def supported() -> bool:
    return hasattr(os, "memfd_create")


class Arena:
    """A growable shared buffer over one memfd. The rank writes (`reserve` then `buffer`), the host reads (`view`)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map: mmap.mmap | None = None

    @classmethod
    def create(cls, name: str) -> "Arena":
        return cls(os.memfd_create(name, os.MFD_CLOEXEC))

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def buffer(self, nbytes: int) -> mmap.mmap:
        """A mapping of at least `nbytes`, growing the arena when needed (rank side)."""
        if self.size < nbytes:
            # Grow in steps so a batch a little larger than the last does not remap every call.
            os.ftruncate(self.fd, max(nbytes, 2 * self.size))
        return self._mapping(nbytes)

    def view(self, offset: int, nbytes: int) -> memoryview:
        """Bytes [offset, offset + nbytes) as the peer wrote them (host side). ValueError when out of range."""
        end = offset + nbytes
        if offset < 0 or nbytes < 0 or end > self.size:
            raise ValueError(f"arena range [{offset}, {end}) is outside the arena's {self.size} bytes")
        return memoryview(self._mapping(end))[offset:end]

    def _mapping(self, nbytes: int) -> mmap.mmap:
        if self._map is None or len(self._map) < nbytes:
            # A previous mapping stays alive as long as tensors view it; dropping our reference is enough.
            self._map = mmap.mmap(self.fd, self.size)
        return self._map

    def close(self) -> None:
        self._map = None
        try:
            os.close(self.fd)
        except OSError:
            pass
