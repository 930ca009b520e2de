"""Small layer tars for tests and benchmarks: many generated small files, or given directories and files."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

MTIME = 1_600_000_000


def small_files_tar(path: Path, count: int, seed: int, *, dirs: int, dir_name: str, file_name: str,
                    random_part: int, text: str) -> Path:
    """Write a tar of ``dirs`` directories, then ``count`` files of 200 B to 3 kB to ``path``.

    File ``i`` is in directory ``i % dirs``; its first ``size // random_part`` bytes are random,
    the rest is ``text`` repeated.  ``dir_name`` and ``file_name`` are format strings of ``d``
    (the directory's number) and ``i``; ``text`` of ``seed`` and ``i``.  Same arguments, same bytes.
    """
    rnd = random.Random(seed)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in range(dirs):
            info = tarfile.TarInfo(dir_name.format(d=d))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        for i in range(count):
            size = rnd.randint(200, 3000)
            share = size // random_part
            data = rnd.randbytes(share) + (text.format(seed=seed, i=i) * size)[: size - share].encode()
            info = tarfile.TarInfo(file_name.format(d=i % dirs, i=i))
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    return path


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
