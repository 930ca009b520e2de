"""Small layer tars for tests: directories and regular files, written with tarfile."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def write_tar(path: Path, dirs: list[str], files: dict[str, bytes], pax: bool = False) -> Path:
    """Write ``dirs`` (mode 0755) and then ``files`` (path -> bytes, mode 0644) to the tar ``path``."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT if pax else tarfile.DEFAULT_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path
