"""One durable write: replace a file so that a crash leaves either the old or the new content."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_durably(path, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync it, rename it over ``path``, fsync the directory."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return  # no directory handles on this platform
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
