"""Restart without the registry (stargz-snapshotter #1989, #703, #314; SOCI #487, #1084).

The registry goes away, then ``lazyd snapshotter`` and ``lazyd serve`` are restarted as
systemd would (SIGTERM, start again). What is in lazyd's state must come back without it:

* every mounted layer (its TOC is on disk) is served again;
* a running container keeps reading whatever is cached;
* a new container of an image whose layers are wholly cached starts;
* only a read of an uncached chunk fails (EIO, and the layer's error names it); the same
  read works, with no remount, once the registry is back;
* a new container of an image that is not wholly cached is refused with the reason,
  rather than started on layers that may fail any read.

The test's registry serves the session registry's storage on a port of its own, so it can
be stopped and started again on that port without touching the other tests.
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from tests.e2e.images import _blob, manifest_of
from tests.support.procs import wait_until
from tests.support.registry import Registry, start_registry

from .conftest import HELLO, Images, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BIG = "data/big.bin"  # 9 MiB of random bytes in busybox's second layer
BIG_LAYER_HINT = "of blob sha256:"  # the error names the blob (and range) it could not fetch


def _sha256_in_layout(layout: Path, name: str) -> str:
    """sha256 of file ``name`` as the image's layers (valid tar.gz) hold it, upper layer winning."""
    _, manifest = manifest_of(layout, "latest")
    found = None
    for desc in manifest["layers"]:
        with tarfile.open(_blob(layout, desc["digest"]), "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name.lstrip("./") == name:
                    found = hashlib.sha256(tar.extractfile(member).read()).hexdigest()  # type: ignore[union-attr]
    assert found is not None, f"{name} is not in {layout}"
    return found


def _restart_both(stack: Stack) -> None:
    stack.snapshotter.stop()  # SIGTERM, as systemd stops a unit
    stack.lazyd.stop()  # SIGTERM: the daemon exits, its FUSE workers and their mounts stay
    stack.start_lazyd()
    stack.start_snapshotter()
    wait_until(lambda: stack.ctr("snapshots", "--snapshotter", "lazyd", "ls", check=False).returncode == 0, 15,
               "containerd to reach the restarted snapshotter", interval=0.2)


@pytest.mark.lazyd_config(background_fetch=False, prefetch=False)
def test_restart_without_the_registry(stack: Stack, images: Images, registry: Registry, tmp_path: Path) -> None:
    own = start_registry(tmp_path, name="own", storage_root=registry.root)
    port = own.port
    debian = images.debian_esgz.replace(registry.host, own.host)
    busybox = images.busybox_esgz.replace(registry.host, own.host)
    try:
        for ref in (debian, busybox):
            assert {layer["mode"] for layer in stack.rpull(ref)["layers"]} == {"lazy"}
        # Read every file of the debian image once: its layers are then wholly cached.
        stack.run(debian, "walk", "sh", "-c", "find / -xdev -type f -print0 | xargs -0 cat > /dev/null")
        stack.ctr("run", "-d", "--snapshotter", "lazyd", debian, "py", "sleep", "600")
        stack.ctr("run", "-d", "--snapshotter", "lazyd", busybox, "bb", "sleep", "600")
        assert stack.ctr("tasks", "exec", "--exec-id", "e0", "bb", "cat", "/etc/hello.txt").stdout == \
            "hello from lazyd\n"

        own.stop()
        _restart_both(stack)
        status = stack.status()
        assert {m["state"] for m in status["mounts"]} == {"ready"}, status["mounts"]

        # The running containers keep reading what is cached.
        code = "import json, email.parser; print('cached', json.dumps([1]))"
        assert stack.ctr("tasks", "exec", "--exec-id", "e1", "py", "python3", "-c", code).stdout == "cached [1]\n"
        assert stack.ctr("tasks", "exec", "--exec-id", "e2", "bb", "cat", "/etc/hello.txt").stdout == \
            "hello from lazyd\n"
        # A new container of the wholly cached image starts.
        assert stack.run(debian, "new-py", "python3", "-c", f"print({HELLO!r})").stdout == HELLO + "\n"
        # A read of an uncached chunk fails with EIO, and the layer's error says why.
        failed = stack.ctr("tasks", "exec", "--exec-id", "e3", "bb", "sha256sum", f"/{BIG}", check=False)
        assert failed.returncode != 0 and "Input/output error" in failed.stderr, failed
        errors = [m["error"] or "" for m in stack.status()["mounts"] if m["ref"].startswith(busybox + "@")]
        assert any(own.host in e and "unreachable" in e and BIG_LAYER_HINT in e for e in errors), errors
        # A new container of an image that is not wholly cached is refused, with the reason.
        refused = stack.run(busybox, "new-bb", "true", check=False)
        assert refused.returncode != 0 and "unreachable" in refused.stderr, refused

        own = start_registry(tmp_path, name="own-again", port=port, storage_root=registry.root)
        # The same read now works, on the same mount, with the right bytes.
        out = stack.ctr("tasks", "exec", "--exec-id", "e4", "bb", "sha256sum", f"/{BIG}").stdout
        assert out.split()[0] == _sha256_in_layout(images.busybox_esgz_layout, BIG)
        assert stack.run(busybox, "new-bb-2", "cat", "/etc/hello.txt").stdout == "hello from lazyd\n"
    finally:
        own.stop()
