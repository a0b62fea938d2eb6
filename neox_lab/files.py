"""What identifies a file's contents without reading them: checked before reading a file that was
verified (or loaded) earlier, so that a file replaced or rewritten since is never served unchecked."""

from __future__ import annotations

import os


def file_identity(path: str | os.PathLike) -> tuple[int, int, int, int, int]:
    """(device, inode, size, modification and change times in ns) of a file. A write in place moves the
    times, a replacement the inode; the change time cannot be set back by a user (`touch -d` sets only
    the others). File times tick in steps of a few milliseconds: a write within one step of an earlier
    look is the blind spot."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
