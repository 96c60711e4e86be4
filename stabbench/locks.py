"""One writer per directory: an exclusive lock on every run and sweep directory while a
command writes there.

The lock is `flock` on `<dir>/.stabbench.lock`, a file that also names its holder (pid,
host, command, start time) for the refusal message. The kernel drops an flock when its
process dies, however it dies (SIGKILL, out of memory, a node lost), so a lock left by a
dead process is no lock: the next command takes it over without a word. The holder removes
the file as it lets go; a command that locked a file just removed (it opened it a moment
before) sees that the path no longer names its file and tries again.
"""
from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from stabbench.errors import UserError

FILENAME = ".stabbench.lock"
_held: dict[Path, int] = {}  # directory -> fd of the locks this process holds


def holder(folder: Path) -> str:
    """Who holds the lock on `folder`, as its lock file says."""
    try:
        text = (Path(folder) / FILENAME).read_text(errors="replace")[:500].strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process"


def acquire(folder: Path | str) -> None:
    """Lock `folder` (made if missing) for this process, or raise UserError naming the holder.
    Locking a folder this process already holds is a no-op."""
    folder = Path(folder).absolute()
    if folder in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{folder} is in use by {holder(folder)}; wait for that command to end or stop it, "
                            f"or choose another hydra.run.dir / hydra.sweep.dir") from None
        except OSError:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this file as we locked it: lock the path's file afresh
    command = " ".join(["stabbench", *sys.argv[1:]])[:300]
    note = (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"({command})\n")
    os.ftruncate(fd, 0)
    os.pwrite(fd, note.encode(errors="replace"), 0)
    _held[folder] = fd


def release(folder: Path | str) -> None:
    folder = Path(folder).absolute()
    fd = _held.pop(folder, None)
    if fd is not None:
        try:
            (folder / FILENAME).unlink()  # while still locked: no other command holds this file
        except OSError:
            pass
        os.close(fd)  # closing drops the flock


def release_all() -> None:
    for folder in list(_held):
        release(folder)
