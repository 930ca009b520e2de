"""Helpers of the convert tests: run lazyctl, verify blobs with the reference tools, read eStargz lazily."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

from lazyd.registry import Descriptor, Reference, RegistryClient

INTEROP_BIN = Path(os.environ.get("LAZYD_INTEROP_DIR", "/opt/lazyd-interop")) / "bin"


def lazyctl(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "lazyd.cli.lazyctl", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lazyctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def lazyctl_on_tty(*args: str, timeout: float = 600) -> tuple[int, str]:
    """Run lazyctl with stderr on a pseudo-terminal; returns (exit status, what it drew there)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120x40 terminal
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lazyd.cli.lazyctl", *args], stdout=subprocess.DEVNULL,
                                stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        out = bytearray()
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout), out.decode(errors="replace")
    finally:
        os.close(master)


def estargz_verify(blob: Path, toc_digest: str) -> str:
    proc = subprocess.run([str(INTEROP_BIN / "estargz-verify"), "-toc-digest", toc_digest, str(blob)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "RESULT: OK" in proc.stderr, f"estargz-verify failed on {blob}:\n{proc.stderr}"
    return proc.stderr


def dump_toc(blob: Path) -> dict:
    proc = subprocess.run([str(INTEROP_BIN / "estargz-verify"), "-dump-toc", str(blob)], capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def diff_id_of(blob: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with gzip.open(blob, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return f"sha256:{h.hexdigest()}", n


async def read_estargz_file(client: RegistryClient, ref: Reference, desc: Descriptor, name: str) -> bytes:
    """Read one file of an eStargz layer through range requests only (footer, TOC, then its chunks)."""
    from lazyd import estargz

    (tail,) = await client.fetch_ranges(ref, desc.digest, [(desc.size - estargz.FOOTER_SIZE, estargz.FOOTER_SIZE)])
    toc_offset = estargz.parse_footer(tail, desc.size)
    (member,) = await client.fetch_ranges(ref, desc.digest, [(toc_offset, desc.size - toc_offset - estargz.FOOTER_SIZE)])
    toc = estargz.TOC.parse(estargz.decode_toc_member(member), expected_digest=desc.toc_digest)
    entry = toc.lookup(name)
    assert entry is not None, f"{name} not in the TOC of {desc.digest}"
    chunks = toc.file_chunks(entry)
    parts = await client.fetch_ranges(ref, desc.digest, [(c.blob_offset, c.blob_end - c.blob_offset) for c in chunks])
    return b"".join(estargz.decode_chunk(c, p) for c, p in zip(chunks, parts))
