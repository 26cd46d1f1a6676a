"""Durable file system updates: a rename is only as safe as the folder entry that records it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Errors a folder fsync may give where the file system cannot sync folders (harmless).
_UNSYNCABLE = (errno.EINVAL, errno.EBADF, errno.EISDIR, errno.ENOTSUP)
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def fsync_dir(path: str | os.PathLike[str], *, strict: bool = False) -> None:
    """fsync the folder ``path`` so that a rename or creation inside it survives a crash.

    A file system that cannot open or sync folders makes this a no-op. With ``strict``, a full
    disk while opening, and any sync error other than "cannot sync folders", is raised (the
    caller reports it); without, every OSError is ignored.
    """
    try:
        fd = os.open(Path(path), os.O_RDONLY)
    except OSError as exc:
        if strict and exc.errno in _DISK_FULL:
            raise
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if strict and exc.errno not in _UNSYNCABLE:
            raise
    finally:
        os.close(fd)
