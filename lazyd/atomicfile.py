"""Replace a file whole: write a temporary file beside it, then rename it into place."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so that readers see the old or the new file;
    ``sync`` makes it durable first.  The temporary file (hidden, beside ``path``) is named for
    the process and thread, so concurrent writers of one path each replace it whole; it is
    removed when the write fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
