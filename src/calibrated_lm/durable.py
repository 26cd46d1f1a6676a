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


def save_figure(fig: object, path: str | os.PathLike[str], **kwargs: object) -> Path:
    """``fig.savefig(path, **kwargs)`` written to a temporary name in the same folder and
    renamed into place: a crash or a full disk mid-write leaves the previous figure (or none),
    never a torn file that image viewers reject."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fmt = kwargs.pop("format", None) or path.suffix.lstrip(".")  # the tmp name hides the type
    try:
        fig.savefig(tmp, format=fmt, **kwargs)  # type: ignore[attr-defined]
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path
