"""Files that survive a crash: either the old content or the new, never a torn mix.

One way to write, used by every file edgefl keeps (the device's outbox, privacy budget, state and
saved model; the trust module's pinned keys and sequence numbers; the fleet's provisioning files):
write a temporary file next to the target, fsync it, rename it over the target (atomic on POSIX
and Windows), then fsync the directory, so that the rename itself is on disk.

Windows cannot open a directory to fsync it; there the rename (``MoveFileEx``, what
:func:`os.replace` calls) is the last step, and a crash right after it may still show the old
file, never a torn one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: Suffix of the temporary files; a reader that finds one left by a crash may delete it.
TEMP_SUFFIX = ".tmp"


def fsync_directory(directory) -> None:
    """Make the entries of ``directory`` (a rename, a new or deleted file) durable.

    A no-op on Windows, which has no directory handles to fsync.
    """
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path, data: bytes, *, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` durably (temp file, fsync, rename, fsync of the directory).

    Parameters
    ----------
    path : path-like
        The file to write; its directory must exist.
    data : bytes
        The whole new content.
    mode : int, optional
        Permission bits of the new file (0o600, the temporary file's, by default).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def create_file(path, data: bytes, *, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` durably unless it exists: what is never overwritten (keys).

    Returns
    -------
    bool
        True if the file was created, False (nothing written) if it existed already.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return True
