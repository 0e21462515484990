"""Files only their owner may read: the instance directory and what keygate keeps in it.

The store file holds key hashes and the audit trail, the rate-limit table key ids; the
process umask (often 022) would leave them readable by every local user. Modes are set
explicitly rather than left to the umask, whichever code path creates the file first.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory; created 0700 if missing (parents as the umask says)."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            return path  # created meanwhile by another process, which set its mode
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered through the umask
    return path


def private_file(path: str | os.PathLike[str]) -> None:
    """Create ``path`` empty and 0600 unless it exists (an existing file is left as it is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
