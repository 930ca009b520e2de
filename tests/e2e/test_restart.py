"""Restarting ``lazyd snapshotter`` and ``lazyd serve`` under a running container.

* The snapshotter holds no mounts itself: after a restart, the running container keeps
  reading through its lazily mounted layers, and new containers start once containerd has
  redialled the snapshotter's socket (its first call on the old connection fails).
* The FUSE workers outlive ``lazyd serve``; a new ``lazyd serve`` adopts their mounts.
  The running container keeps working, including reads of files that were never read
  before (they need fetches through the new daemon), and new containers start.
"""

from __future__ import annotations

import pytest

from tests.support.procs import wait_until

from .conftest import HELLO, Images, Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Each check imports modules no earlier check touched, so the bytes must come through lazyd now.
FIRST = "import json; print('first', json.dumps([1]))"
AFTER_SNAPSHOTTER = "import email.parser, http.client; print('after snapshotter restart')"
AFTER_LAZYD = "import xml.dom.minidom, sqlite3; print('after lazyd restart')"


def _exec(stack: Stack, container: str, exec_id: str, code: str) -> str:
    return stack.ctr("tasks", "exec", "--exec-id", exec_id, container, "python3", "-c", code).stdout


def test_restarts_keep_containers_working(stack: Stack, images: Images) -> None:
    stack.rpull(images.debian_esgz)
    stack.ctr("run", "-d", "--snapshotter", "lazyd", images.debian_esgz, "long", "sleep", "600")
    assert _exec(stack, "long", "e1", FIRST) == "first [1]\n"

    stack.snapshotter.stop()
    stack.start_snapshotter()
    # containerd's first call on its old proxy connection fails ("connection closed"); it redials on the next.
    wait_until(lambda: stack.ctr("snapshots", "--snapshotter", "lazyd", "ls", check=False).returncode == 0, 15,
               "containerd to reach the restarted snapshotter", interval=0.2)
    assert _exec(stack, "long", "e2", AFTER_SNAPSHOTTER) == "after snapshotter restart\n"
    assert stack.run(images.debian_esgz, "new-1", "python3", "-c", f"print({HELLO!r})").stdout == HELLO + "\n"

    stack.lazyd.stop()  # SIGTERM: the daemon exits, its FUSE workers stay
    stack.start_lazyd()
    assert _exec(stack, "long", "e3", AFTER_LAZYD) == "after lazyd restart\n"
    assert stack.run(images.debian_esgz, "new-2", "python3", "-c", f"print({HELLO!r})").stdout == HELLO + "\n"
    stack.status()
