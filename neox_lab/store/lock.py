"""`StoreLock`: the exclusive advisory lock of a store directory (`directory/.lock`).

A writer (`cache_dataset`) holds it from the start of its run to the end; a reader takes it only for
the moment it saves its normalisation statistics, and only if nobody holds it. The OS drops it when
the process dies.
"""

from __future__ import annotations

import os
from pathlib import Path

from .manifest import CacheBusyError

LOCK_FILE = ".lock"


class StoreLock:
    """An exclusive flock on `directory/.lock`; `CacheBusyError` if another process holds it.

    The file is never deleted: unlinking it while a second process has it open but not yet locked would
    let that process lock the orphaned inode while a third locks a fresh file, two holders at once.
    """

    def __init__(self, directory: Path):
        self.path, self.fd = Path(directory) / LOCK_FILE, None
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unguarded
            return
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            msg = f"another process is writing the cache in {directory} (it holds {self.path})"
            raise CacheBusyError(msg) from None

    def release(self) -> None:
        if self.fd is None:
            return
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
