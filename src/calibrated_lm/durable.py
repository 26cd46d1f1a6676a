"""Durable file system updates: a rename is only as safe as the folder entry that records it.

Every file that a later run reads, and every report a person reads, is replaced whole through
the writers here (:func:`write_text`, :func:`write_bytes`, :func:`write_json`,
:func:`atomic_open` for streamed writes, :func:`atomic_path` for libraries that write by file
name, :func:`save_figure`). Each one

1. writes to a temporary sibling (``.<name>.tmp-<pid>-<random>``: same folder, so the rename
   cannot cross file systems; hidden and not ending in the target's suffix, so globs such as
   ``results_*.json`` or ``samples.rank*.jsonl`` never pick it up; unique, so two writers
   never share one),
2. flushes it and ``os.fsync``-s it (the data is on disk before any name points at it),
3. ``os.replace``-s it over the target (atomic: a reader sees the old file or the new one),
4. fsyncs the folder (the rename itself survives a power loss).

A failure before the rename (a full disk, a serialisation error, a kill that Python sees)
removes the temporary and leaves the previous file, or none, untouched. A full disk or an
exhausted quota is re-raised as an ``OSError`` with the same ``errno`` and ``strerror`` and the
*target's* name as ``filename``: the CLI turns it into ``error: No space left on device:
<target>``, ``write_checkpoint`` into its "checkpoints already written are kept" sentence,
``calibrated-lm metrics`` into "cannot write to <folder>". Only a hard kill (SIGKILL, power
loss) between steps 1 and 3 can leave a temporary behind; it is never read.

Folders written as a whole (training checkpoints and ``final/``, the model cache's converted
folders) do the same one level up: every file in a temporary folder is fsynced, then the
folder, then it is renamed into place and its parent fsynced (``training/checkpoint.py``,
``models/loading.py``). Files inside such a temporary folder are written directly.

Append-only journals are not replaced but grown, so they are kept safe differently:

* ``samples.jsonl`` and ``samples.rank<r>.jsonl`` (``eval``): every batch of scored questions is
  appended, flushed and fsynced (``evaluation/samples_file.SamplesWriter``), and the folder is
  fsynced when the journal is created; a crash loses at most the batch in flight. The reader
  (``read_records``) drops a final line cut short (no newline, not JSON) and truncates it away
  before appending again, keeps a complete final record whose newline was lost, and refuses a
  damaged line anywhere else. Rewrites (stale records dropped) go through
  :func:`write_bytes`-style atomic replacement (``calibration.samples.write_sample_records``).
* ``metrics.jsonl`` (``train``): one line appended and flushed per logged step; the file is
  fsynced before every checkpoint is written and when the run ends
  (``training/tracking.JsonlTracker.sync``), so every line a checkpoint covers is on disk
  once the checkpoint is. Lines after the newest checkpoint may be lost or torn by a crash: a
  resume redoes those steps, drops every line that does not parse and rewrites the file to
  the checkpointed step atomically (``training/resume.truncate_metrics``).

``docs/durability.md`` lists every file written, who reads it later and how it is written;
``tests/test_durable.py`` fails on a raw write outside this module that is not on its list.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

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


def temp_name(path: str | os.PathLike[str], prefix: str | None = None) -> Path:
    """A fresh temporary sibling of ``path``: ``prefix`` (default ``.<name>.tmp-<pid>-``)
    followed by random hex. Nothing is created."""
    path = Path(path)
    head = prefix if prefix is not None else f".{path.name}.tmp-{os.getpid()}-"
    return path.with_name(head + secrets.token_hex(6))


def _disk_full(exc: OSError, path: Path) -> OSError:
    """``exc`` as an OSError naming the target ``path`` instead of the temporary."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """``os.replace(src, dst)``, then fsync ``dst``'s folder (and ``src``'s, when another) so
    the rename survives a crash. ``src`` must already be complete and fsynced. Returns
    ``dst`` as a Path."""
    src, dst = Path(src), Path(dst)
    os.replace(src, dst)
    fsync_dir(dst.parent, strict=True)
    if src.parent != dst.parent:
        fsync_dir(src.parent, strict=True)
    return dst


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, prefix: str | None = None) -> Iterator[Path]:
    """The name of a temporary sibling of ``path`` for a writer that takes a file name
    (``savefig``, ``torch.save``): the body creates and fills that file; on a clean exit it is
    fsynced and renamed over ``path`` and the folder fsynced (module docstring).

    If the body raises, or leaves no file, nothing is renamed: the temporary is removed,
    ``path`` keeps its previous content (or stays absent) and the exception propagates (a
    full disk as an OSError naming ``path``; no file at all as FileNotFoundError).
    ``prefix``: the temporary's name up to its random tail (default ``.<name>.tmp-<pid>-``).
    """
    with _replacing(Path(path), prefix, sync_tmp=True) as tmp:
        yield tmp


@contextmanager
def _replacing(path: Path, prefix: str | None, *, sync_tmp: bool) -> Iterator[Path]:
    """:func:`atomic_path`; without ``sync_tmp`` the body has fsynced the temporary itself
    (:func:`atomic_open`, through its handle)."""
    tmp = temp_name(path, prefix)
    try:
        yield tmp
        if sync_tmp:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in _DISK_FULL:
            raise _disk_full(exc, path) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent, strict=True)


@contextmanager
def atomic_open(
    path: str | os.PathLike[str],
    mode: str = "w",
    *,
    encoding: str = "utf-8",
    prefix: str | None = None,
) -> Iterator[IO[Any]]:
    """A handle on a new temporary sibling of ``path`` (``mode`` ``"w"``: text, ``"wb"``:
    bytes); on a clean exit the handle is flushed, fsynced and closed, renamed over ``path``
    and the folder fsynced. On an exception nothing is renamed and the temporary is removed,
    as in :func:`atomic_path`. The file is created with mode 0o666 less the umask, as
    ``open`` would; text is written without newline translation (``"\\n"`` stays ``"\\n"``).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    with _replacing(path, prefix, sync_tmp=False) as tmp:
        # "x": the temporary is ours alone (a name clash fails instead of sharing a file).
        if mode == "wb":
            fh: IO[Any] = open(tmp, "xb")
        else:
            fh = open(tmp, "x", encoding=encoding, newline="")
        try:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fh.close()


def write_bytes(path: str | os.PathLike[str], data: bytes, *, prefix: str | None = None) -> Path:
    """Replace ``path`` by exactly ``data``, atomically and durably (module docstring).
    Returns ``path`` as a Path."""
    path = Path(path)
    with atomic_open(path, "wb", prefix=prefix) as fh:
        fh.write(data)
    return path


def write_text(
    path: str | os.PathLike[str],
    text: str,
    *,
    encoding: str = "utf-8",
    prefix: str | None = None,
) -> Path:
    """Replace ``path`` by ``text`` (encoded with ``encoding``, newlines as given), atomically
    and durably. A text that cannot be encoded raises before anything is written."""
    return write_bytes(path, text.encode(encoding), prefix=prefix)


def write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 1,
    prefix: str | None = None,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Replace ``path`` by ``obj`` as strict JSON (``allow_nan=False``: a NaN or infinity is a
    ValueError, raised before anything is written) plus a final newline, atomically and
    durably. ``indent=None`` writes one line. Callers with non-finite values pass them
    through :func:`calibrated_lm.calibration.jsonfile.json_safe` first (``null``)."""
    text = json.dumps(obj, indent=indent, allow_nan=False, default=default) + "\n"
    return write_text(path, text, prefix=prefix)


def save_figure(fig: object, path: str | os.PathLike[str], **kwargs: object) -> Path:
    """``fig.savefig(path, **kwargs)`` written to a temporary name in the same folder, fsynced
    and renamed into place (:func:`atomic_path`): a crash or a full disk mid-write leaves the
    previous figure (or none), never a torn file that image viewers reject."""
    path = Path(path)
    fmt = kwargs.pop("format", None) or path.suffix.lstrip(".")  # the tmp name hides the type
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)  # type: ignore[attr-defined]
    return path
