"""Helpers for the small-cache tests: ``lazyd serve`` with its chunk store on a tmpfs of its own.

A tmpfs under ``<root>/cache`` makes the store's disk use one ``statvfs`` call: an atomic
count of the blocks every file of the store (value files, SQLite database, write-ahead
log) takes, which ``DiskPeak`` samples in a thread while a test reads.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from lazyd.estargz import BuildOptions
from tests.support.estargz_images import EStargzImage, build_layers, push_layers
from tests.support.lazyd import Lazyd, start_lazyd, unmount_all_below


def random_text(rnd: random.Random, size: int) -> bytes:
    """``size`` bytes of words: compresses about 2.5:1, so gzip members are smaller than chunks."""
    words = [rnd.randbytes(rnd.randint(2, 9)).hex().encode() for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(words) + b" "
    return bytes(out[:size])


def build_image(registry_host: str, name: str, files: dict[str, bytes], work: Path,
                chunk_size: int | None = None) -> tuple[EStargzImage, Path]:
    """One eStargz layer holding ``files`` (in this order), pushed as ``host/name``; returns it and its tar."""
    work.mkdir(parents=True, exist_ok=True)
    tar = work / "layer.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_600_000_000
            tf.addfile(info, io.BytesIO(data))
    options = BuildOptions() if chunk_size is None else BuildOptions(chunk_size=chunk_size)
    layers = build_layers([tar], work / "esgz", options)
    return push_layers(registry_host, name, layers), tar


def start_small_cache_lazyd(base: Path, cache_size: int, extra: str = "", tmpfs_size: int = 512 << 20) -> Lazyd:
    """``lazyd serve`` (one worker) with ``cache_size`` and ``extra`` config, its store on a tmpfs.

    The caller stops it with ``.close(unmount=base)`` (that also unmounts the tmpfs).
    """
    cache = base / "root" / "cache"
    cache.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_size},mode=0700", "lazyd-test-cache", str(cache)],
                   check=True)
    config = base / "config.toml"
    config.write_text(f"workers = 1\ncache_size = {cache_size}\nfetch_timeout = 30.0\n{extra}\n"
                      f"[registry]\nhosts_dir = \"{base / 'certs.d'}\"\nretries = 0\n")
    return start_lazyd(base / "root", base / "run" / "lazyd.sock", base / "lazyd.log", config=config,
                       args=("--log-level", "debug"), workers=1)


@contextmanager
def small_cache_lazyds(base: Path) -> Iterator[Callable[[int, str], Lazyd]]:
    """``start(cache_size, extra)`` starts another ``start_small_cache_lazyd`` below ``base``; on leaving,
    each is closed (with its mounts) and everything still mounted below ``base`` is unmounted."""
    started: list[Lazyd] = []

    def start(cache_size: int, extra: str) -> Lazyd:
        lazyd = start_small_cache_lazyd(base / f"d{len(started)}", cache_size, extra)
        started.append(lazyd)
        return lazyd

    try:
        yield start
    finally:
        for lazyd in started:
            lazyd.close(unmount=lazyd.root.parent)
        unmount_all_below(base)


def used_bytes(path: Path) -> int:
    """Bytes in use on the filesystem of ``path`` (one atomic ``statvfs``)."""
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class DiskPeak:
    """Samples ``used_bytes(path)`` every millisecond while in a ``with`` block; ``peak`` is the largest."""

    def __init__(self, path: Path, interval: float = 0.001) -> None:
        self.path = path
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="disk-peak", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, used_bytes(self.path))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, used_bytes(self.path))
