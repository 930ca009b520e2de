"""Create the Unix sockets lazyd listens on, never reachable with wider permissions than intended.

A listening socket is bound inside a fresh private directory next to its final path (``mkdtemp``:
mode 0700, owner root), given its final mode (0600, or 0660 with a ``socket_group``) and group,
made to listen, and only then renamed to its final path.  Until the rename only root can reach it,
whatever the process umask; after it, the socket already has its final mode.  The umask is never
changed: it is per process, so a temporary one would also apply to files that other threads create
and to child processes started meanwhile.

Missing parent directories of the socket are created one at a time with mode 0700, or 0710 and the
socket's group when there is one (group members may pass through, not list).
"""

from __future__ import annotations

import grp
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_PATH_BYTES = 107
"""Longest Unix socket path on Linux (``sun_path`` is 108 bytes with the terminating NUL)."""

_STAGING_NAME = "s"


class SocketSetupError(RuntimeError):
    """A listening socket could not be created with its intended path, mode or group."""


def group_exists(name: str) -> bool:
    """Whether ``name`` is a group of this host (the ``socket_group`` check at start-up)."""
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def group_id(name: str) -> int:
    """The gid of group ``name``; SocketSetupError naming it when there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise SocketSetupError(f"socket group {name!r} does not exist on this host (see 'getent group')") from None


def socket_mode(gid: int | None) -> int:
    """0600, or 0660 when the socket is shared with a group."""
    return 0o600 if gid is None else 0o660


def directory_mode(gid: int | None) -> int:
    """Mode of a parent directory lazyd creates: 0700, or 0710 when a group must reach the socket."""
    return 0o700 if gid is None else 0o710


def _group_can_search(st: os.stat_result, gid: int) -> bool:
    return bool(st.st_mode & stat.S_IXOTH) or (st.st_gid == gid and bool(st.st_mode & stat.S_IXGRP))


def _set_group_and_mode(path: Path, gid: int | None, mode: int, what: str) -> None:
    """Give ``path`` group ``gid`` (when there is one), then ``mode``; SocketSetupError naming ``what``."""
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        raise SocketSetupError(f"cannot set mode {mode:04o} and group {gid} on {what}: {exc.strerror}") from exc


def make_parents(directory: Path, gid: int | None) -> list[Path]:
    """Create the missing directories of ``directory`` (outermost first); returns those created.

    Each new one gets ``directory_mode(gid)`` and group ``gid``: it is made with mode 0700 (a umask
    can only narrow that) and widened to 0710 only after its group is set.  Existing directories are
    left alone; with a group, one its members cannot pass through is logged as a warning.
    """
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    if gid is not None:
        for existing in [d, *d.parents]:
            st = existing.stat()
            if not _group_can_search(st, gid):
                log.warning("members of group %d cannot reach sockets below %s: its mode %04o (owner %d:%d) "
                            "does not let them pass through", gid, existing, stat.S_IMODE(st.st_mode), st.st_uid,
                            st.st_gid)
                break
    created: list[Path] = []
    for new in reversed(missing):
        try:
            new.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: leave it as it is
        except OSError as exc:
            raise SocketSetupError(f"cannot create socket directory {new}: {exc.strerror}") from exc
        _set_group_and_mode(new, gid, directory_mode(gid), f"socket directory {new}")
        created.append(new)
    return created


def _warn_if_others_can_replace(directory: Path) -> None:
    """Warn when someone else could swap the socket in ``directory`` for their own (owner, or write access)."""
    st = directory.stat()
    foreign_owner = st.st_uid not in (0, os.geteuid())
    open_to_others = bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) and not st.st_mode & stat.S_ISVTX
    if foreign_owner or open_to_others:
        log.warning("socket directory %s (mode %04o, owner %d:%d) lets others replace the socket; "
                    "put it in a directory only root can write to", directory, stat.S_IMODE(st.st_mode),
                    st.st_uid, st.st_gid)


def publish(path: Path, gid: int | None, bind: Callable[[str], None], listen: Callable[[], None]) -> None:
    """Create a listening socket at ``path`` with mode ``socket_mode(gid)`` and group ``gid``.

    ``bind(staging_path)`` binds the server's socket at a path inside a new private (0700) directory
    next to ``path`` (it may also start listening: gRPC's ``add_insecure_port`` does both); the socket
    then gets its mode and group, ``listen()`` makes it accept connections, and it is renamed to
    ``path``, atomically replacing a stale socket there.  A non-socket at ``path`` is never replaced.
    """
    if len(os.fsencode(str(path))) > MAX_PATH_BYTES:
        raise SocketSetupError(f"socket path {path} is too long for a Unix socket (at most {MAX_PATH_BYTES} bytes)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise SocketSetupError(f"cannot check socket path {path}: {exc.strerror}") from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketSetupError(f"{path} exists and is not a socket; refusing to replace it")
    make_parents(path.parent, gid)
    _warn_if_others_can_replace(path.parent)
    try:
        staging_dir = Path(tempfile.mkdtemp(prefix=".l", dir=path.parent))
    except OSError as exc:
        raise SocketSetupError(f"cannot create a private directory in {path.parent} for the socket: "
                               f"{exc.strerror}") from exc
    staging = staging_dir / _STAGING_NAME
    try:
        if len(os.fsencode(str(staging))) > MAX_PATH_BYTES:
            raise SocketSetupError(f"socket path {path} is too long for a Unix socket: it is first bound at "
                                   f"{staging}, which is longer than {MAX_PATH_BYTES} bytes")
        try:
            bind(str(staging))
        except OSError as exc:
            raise SocketSetupError(f"cannot bind a socket for {path}: {exc}") from exc
        _set_group_and_mode(staging, gid, socket_mode(gid), f"the socket for {path}")
        try:
            listen()
            os.rename(staging, path)
        except OSError as exc:
            raise SocketSetupError(f"cannot listen on {path}: {exc}") from exc
    finally:
        try:
            staging.unlink(missing_ok=True)
            staging_dir.rmdir()
        except OSError as exc:
            log.warning("cannot remove the socket staging directory %s: %s", staging_dir, exc)
