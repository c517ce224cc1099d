"""An exclusive lock on a directory, so that two masa processes never write one run or output at once.

The lock is ``fcntl.flock`` on a small file beside the directory (``.NAME.lock``, so that the directory
itself may be replaced while locked). The kernel releases it when its holder exits or is killed, so a
crash never leaves a stale lock; the file merely records the last holder for the message a second
process gets. Locks are advisory: they guard masa processes against each other, on one machine (and on
network filesystems whose flock is honoured across machines, such as NFSv4 on Linux).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DirectoryLockedError(OSError):
    """Another process holds the lock; the message names it and what to do."""


def lock_path(directory: str | os.PathLike) -> Path:
    """The lock file of ``directory``: ``.NAME.lock`` beside it (symlinks resolved)."""
    directory = Path(directory).resolve()
    return directory.with_name(f".{directory.name}.lock")


def _holder(fd: int) -> str:
    """The recorded holder of a lock file, in words ("pid 123, `masa train ...`, since 12:00:01")."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, `{info['command']}`, since {since}"
    except (ValueError, KeyError, TypeError, OSError):  # written by a holder that has only just started
        return "a process that has just started"


def _command_line() -> str:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    program = "masa" if program in ("masa", "cli.py", "__main__.py") else program
    return " ".join([program, *sys.argv[1:]])[:200]


@contextmanager
def directory_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (which need not exist yet) for the ``with`` block.

    Raises ``DirectoryLockedError`` at once, naming the holder's pid and command, when another process
    holds it. Yields the lock file's path.
    """
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DirectoryLockedError(
                f"{directory} is in use by another masa process ({_holder(fd)}): wait for it to finish "
                "or stop it, or choose another output"
            ) from None
        record = {
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "command": _command_line(),
            "since": time.time(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
