"""File-system helpers shared by the writers that build a directory under a temporary name."""

from __future__ import annotations

import os
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting and restoring it, under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_default_modes(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes a plain mkdir/open would have: 0777 for
    directories and 0666 for files, less the umask (0755 / 0644 under the usual 022).

    `tempfile.mkdtemp` creates its directory 0700 (and some writers create files 0600); a
    directory assembled there and renamed into place would otherwise stay private."""
    mask = current_umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
