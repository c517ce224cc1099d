"""Atomic writes: a directory or a JSON file appears complete or not at all.

A directory is written into a hidden sibling ``.NAME.tmp-PID-HEX``; its files get ordinary permissions
(``0666 & ~umask``) and are fsynced, then it is renamed into place:

* a new target: ``renameat2(RENAME_NOREPLACE)``, so a target that another process wrote meanwhile is
  never replaced silently (without renameat2: ``rename``, which replaces only an empty directory);
* an existing target with ``overwrite``: ``renameat2(RENAME_EXCHANGE)`` swaps the two in one step and the
  old copy is removed. Where the system or filesystem cannot exchange, the target is first renamed to
  ``.NAME.old-PID-HEX`` and the new copy renamed into place: a kill between those two renames leaves the
  target missing and the old copy under that hidden name, which the next save to the place puts back.

Leftovers of killed saves (``.tmp-*``, ``.old-*``) whose process is gone are removed by the next save to
the same place.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}  # flag unknown to the kernel or filesystem
_TAKEN = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR}  # the target is already there
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_OWNER = re.compile(r"-(\d+)-[0-9a-f]+$")  # .NAME.tmp-PID-HEX


class NoSpaceError(OSError):
    """A save ran out of disk space; the message names the filesystem, the file and what is intact."""


# ------------------------------------------------------------------------------------------ renames


@functools.cache
def _renameat2_function() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (musl, macOS ...)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def renameat2(src: str | os.PathLike, dst: str | os.PathLike, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the system or the filesystem lacks it or the flag."""
    fn = _renameat2_function()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), os.fspath(src), None, os.fspath(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename, failing when ``dst`` exists; the fallback ``rename`` replaces only an empty directory."""
    if not renameat2(src, dst, RENAME_NOREPLACE):
        os.rename(src, dst)


def _replace(new: Path, target: Path) -> None:
    """Put directory ``new`` in the place of the existing ``target`` and delete the old copy."""
    if renameat2(new, target, RENAME_EXCHANGE):
        _remove(new)  # `new` now names the previous copy
        return
    old = _sibling(target, "old")
    os.rename(target, old)
    try:
        os.rename(new, target)  # a kill just before this leaves `old`: the next save puts it back
    except BaseException:
        os.rename(old, target)
        raise
    _remove(old)


def _move_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    for move in (_rename_noreplace, os.rename):  # the second replaces an empty directory only
        try:
            move(tmp, target)
            return
        except OSError as err:
            if err.errno not in _TAKEN:
                raise
    if not overwrite:
        raise FileExistsError(
            f"{target} appeared while this save was running (another process wrote it) and was kept; "
            "this save was discarded: choose another output or pass overwrite=True"
        )
    _replace(tmp, target)


# ----------------------------------------------------------------------------------------- leftovers


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _owner_alive(path: Path) -> bool:
    """Whether the process that made this leftover may still be writing it (unknown owners are gone)."""
    match = _OWNER.search(path.name)
    if match is None:  # named by an older masa (mkdtemp): no owner recorded
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Clean up after saves to ``directory`` that were killed; returns the leftovers handled.

    A previous copy that a kill left hidden (``.NAME.old-*``) is put back when ``directory`` is missing;
    every other leftover of a process that is gone is removed.
    """
    directory = Path(directory)
    if not directory.parent.is_dir():
        return []
    prefixes = (f".{directory.name}.tmp-", f".{directory.name}.old-")
    stale = [p for p in directory.parent.iterdir() if p.name.startswith(prefixes) and not _owner_alive(p)]
    olds = sorted((p for p in stale if p.name.startswith(prefixes[1])), key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(directory):
        source = olds[-1] / "x" if (olds[-1] / "x").is_dir() else olds[-1]  # older masa nested it in x/
        os.rename(source, directory)
        log.warning("warning: put back %s from %s, left by a save that was killed", directory, olds[-1].name)
    removed = [p for p in stale if os.path.lexists(p)]
    for path in removed:
        _remove(path)
    if removed:
        log.warning("warning: removed %d leftover(s) of killed saves to %s", len(removed), directory)
    return stale


# ------------------------------------------------------------------------------------------ disk full


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() or not os.path.ismount(path):
        path = path.parent
    return path


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` reports a full disk or quota (safetensors says so only in its message)."""
    return getattr(err, "errno", None) in _DISK_FULL or "no space left on device" in str(err).lower()


def no_space_error(err: BaseException, writing: Path, kept: str) -> NoSpaceError:
    """The error to raise for the disk-full ``err``: where space ran out, what was written, what is intact."""
    quota = " (disk quota exceeded)" if getattr(err, "errno", None) == errno.EDQUOT else ""
    error = NoSpaceError(
        f"no space left on {_mount_point(writing)}{quota} while writing {writing}; {kept}: "
        "free some space (or write elsewhere) and run again"
    )
    error.errno = errno.ENOSPC
    return error


def _newest_file(tree: Path) -> Path | None:
    files = [p for p in tree.rglob("*") if p.is_file()] if tree.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


# ------------------------------------------------------------------------------------------- writing


def seal(tree: str | os.PathLike) -> None:
    """Give every file in ``tree`` the mode of an ordinary new file and flush files and folders to disk.

    Some writers (safetensors) create files 0600 through a temporary file; a saved model must be as
    readable as any other file, so files get the folder's own mode minus execute bits (``0666 & ~umask``
    for a folder made with ``os.mkdir``).
    """
    tree = Path(tree)
    file_mode = tree.stat().st_mode & 0o666
    for path in (*sorted(tree.rglob("*"), reverse=True), tree):  # contents before their folders
        if path.is_symlink():
            continue
        if path.is_file():
            os.chmod(path, file_mode)
        fsync_path(path)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_target(directory: Path, overwrite: bool) -> None:
    if os.path.lexists(directory) and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a directory: choose another output or remove it")
    if not overwrite and directory.is_dir() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory} already exists and is not empty; choose another output or pass overwrite=True"
        )


@contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``directory``; on success it takes ``directory``'s place.

    ``directory`` may be missing or an empty directory; a non-empty one needs ``overwrite`` and is then
    replaced in one step. On any error the temporary directory is removed and ``directory`` is left as it
    was; running out of disk space raises ``NoSpaceError`` saying so.
    """
    directory = Path(directory)
    recover_leftovers(directory)  # first: a killed swap may have left the previous copy hidden
    _check_target(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    had_copy = directory.is_dir() and any(directory.iterdir())
    tmp = _sibling(directory, "tmp")
    os.mkdir(tmp)  # mode 0777 & ~umask, unlike mkdtemp's 0700
    try:
        yield tmp
        seal(tmp)
        _move_into_place(tmp, directory, overwrite)
        fsync_path(directory.parent)
    except BaseException as err:
        if not is_disk_full(err):
            _remove(tmp)
            raise
        newest = _newest_file(tmp)
        _remove(tmp)
        writing = directory / newest.relative_to(tmp) if newest else directory
        kept = (
            f"the previous copy of {directory} is intact"
            if had_copy
            else f"nothing was written to {directory}"
        )
        raise no_space_error(err, writing, kept) from err


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file, fsync, ``os.replace``); a full disk leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not is_disk_full(err):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"{path.name} was not written"
        raise no_space_error(err, path, kept) from err


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON atomically (see :func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log; on a full disk the log is cut back to its previous records and the
    error says so (no torn line is left behind)."""
    path = Path(path)
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        except OSError as err:
            if not is_disk_full(err):
                raise
            os.ftruncate(fd, size)
            raise no_space_error(err, path, f"{path.name} keeps every earlier record") from err
    finally:
        os.close(fd)
