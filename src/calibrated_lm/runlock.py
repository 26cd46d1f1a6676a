"""One process at a time per run folder: an advisory lock on ``FOLDER/.lock``.

Two commands writing the same folder at once (an eval resumed in a second terminal while the
first still runs, two trainings into one ``--output``) interleave journal lines and overwrite
each other's summaries. :func:`run_lock` takes an exclusive, non-blocking ``fcntl.flock`` on
``FOLDER/.lock`` for as long as the command runs; a second process is refused at once with
``UserError("FOLDER is in use by process PID")`` (exit status 2 on the command line).

The lock is advisory and held by the open file, so the kernel drops it when the holder exits,
however it exits (crash, ``kill -9``): a stale ``.lock`` file never blocks anyone. While held
the file holds the holder's PID (a few bytes); on release it is deleted, so an idle run
folder has no lock file (nothing extra for code that lists or packs folders), and a folder
that the lock itself created is removed again when it is still empty. Deleting on
release is safe because an acquirer checks, once it holds the lock, that the path still names
the file it locked, and starts over otherwise.

Under a multi-process launch only one process (rank 0) should hold the lock: pass
``active=False`` on the others.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from calibrated_lm.errors import UserError

LOCK_NAME = ".lock"


def _holder(fd: int) -> str | None:
    """The PID written in the lock file, waiting briefly for a holder that is just writing it."""
    for _ in range(20):
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return text
        time.sleep(0.01)
    return None


def _acquire(path: Path) -> int | None:
    """An fd holding the lock on ``path`` (None where the filesystem has no flock)."""
    folder = path.parent
    for _ in range(1000):  # each retry means another process released or removed it meanwhile
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            # The previous holder removed the folder it had created (empty on release).
            folder.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            who = f"process {pid}" if pid else "another process"
            raise UserError(f"{folder} is in use by {who}") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                try:
                    path.unlink()  # without locks the file means nothing: leave none behind
                except OSError:
                    pass
                print(
                    f"warning: {folder}: this filesystem cannot lock files ({exc.strerror}); "
                    "nothing stops a second run from writing the same folder",
                    file=sys.stderr,
                )
                return None
            raise
        # The previous holder deletes the file on release: if it did so between our open and
        # our flock, we hold a lock on a file nobody else will open. Start over on the new one.
        try:
            a, b = os.stat(path), os.fstat(fd)
            same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            return fd
        os.close(fd)
    raise UserError(f"{folder}: could not take its lock (other processes keep taking it)")


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for d in (folder, *folder.parents):
        if d.exists():
            break
        missing.append(d)
    return missing


@contextmanager
def run_lock(folder: str | os.PathLike[str], *, active: bool = True) -> Iterator[Path]:
    """Hold the lock on ``folder`` for the ``with`` block; yields the lock file's path.

    Raises :class:`UserError` ``"<folder> is in use by process <pid>"`` when another process
    holds it. A missing ``folder`` is created, and removed again on release if it is still
    empty then (so a command that fails before writing anything leaves no folder behind).
    ``active=False`` does nothing (the non-main ranks of a launch). The lock is not
    re-entrant: a second ``run_lock`` on the same folder in the same process is refused too.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    if not active:
        yield path
        return
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; give another output folder")
    created = _missing_dirs(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = _acquire(path)
    except BaseException:
        _remove_if_empty(created)
        raise
    try:
        yield path
    finally:
        if fd is not None:
            # Delete while still holding the lock (see the module docstring), then release.
            try:
                path.unlink()
            except OSError:
                pass
            os.close(fd)
        _remove_if_empty(created)


def _remove_if_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; stops at the first one that holds something
        try:
            d.rmdir()
        except OSError:
            return
