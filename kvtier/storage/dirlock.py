"""The data directory's lock: one process at a time writes a store."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kvtier.errors import StoreLocked


class DataDirLock:
    """An exclusive lock on the data directory, so two processes never write the same store.

    The lock file holds the holder's pid, so that a refused process can say who has it. The
    kernel releases the lock when its holder dies, even by SIGKILL.
    """

    def __init__(self, data_path: Path) -> None:
        data_path.mkdir(parents=True, exist_ok=True)
        self.path = data_path / "kvtier.lock"
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            holder = self.path.read_text().strip() or "another process"
            raise StoreLocked(f"{data_path} is in use by {holder}; stop it first") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()}".encode())

    def release(self) -> None:
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
