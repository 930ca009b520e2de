"""``lazyctl`` commands that talk to ``lazyd serve``: status, mount, umount, check, cache, shutdown."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from lazyd.cli.lazyctl import DEFAULT_SOCKET
from lazyd.cli.output import fail, human_bytes, print_json, print_table
from lazyd.cli.registry import add_global

if TYPE_CHECKING:
    from lazyd.api.client import Client
    from lazyd.api.messages import StatusResult


def _socket_arg(p: argparse.ArgumentParser) -> None:
    add_global(p, "socket", default=DEFAULT_SOCKET, help="daemon socket")


def _json_arg(p: argparse.ArgumentParser) -> None:
    add_global(p, "json", default=False, help="one JSON document for scripts")


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add status, mount, umount, check, cache and shutdown."""
    p = sub.add_parser("status", help="show mounts, fetch counters, workers and cache usage")
    _socket_arg(p)
    _json_arg(p)
    p.set_defaults(func=_status)

    p = sub.add_parser("mount", help="lazily mount one eStargz layer")
    _socket_arg(p)
    p.add_argument("ref", metavar="REF")
    p.add_argument("layer_digest", metavar="LAYER_DIGEST")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--toc-digest", help="TOC digest (default: the layer's manifest annotation)")
    p.add_argument("--no-prefetch-wait", action="store_true", help="do not wait for the prefetch")
    _json_arg(p)
    p.set_defaults(func=_mount)

    p = sub.add_parser("umount", help="unmount a layer mounted by the daemon")
    _socket_arg(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.set_defaults(func=_umount)

    p = sub.add_parser("check", help="is a mount served, and is its registry reachable?")
    _socket_arg(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    _json_arg(p)
    p.set_defaults(func=_check)

    p = sub.add_parser("cache", help="chunk cache usage or eviction")
    _socket_arg(p)
    p.add_argument("action", choices=["stats", "evict"])
    p.add_argument("--layer", dest="layer_digest", help="evict only this (unmounted) layer")
    _json_arg(p)
    p.set_defaults(func=_cache)

    p = sub.add_parser("shutdown", help="clean stop: unmount everything, stop the workers and the daemon")
    _socket_arg(p)
    p.set_defaults(func=_shutdown)


def _call(args: argparse.Namespace, fn: Any) -> int:
    from lazyd.api.client import Client
    from lazyd.api.messages import ApiError

    try:
        with Client(args.socket, timeout=300.0, connect_timeout=2.0) as client:
            return int(fn(client) or 0)
    except ApiError as exc:
        return fail(f"{exc.code}: {exc.message}")


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _profile_cell(m: Any) -> str:
    """The PROFILE column: where the mount's prefetch profile came from, its manifest, bytes prefetched."""
    if not m.profile:
        return "-"
    return f"{m.profile_source}:{m.profile[7:19]} {m.profile_files}f {human_bytes(m.profile_bytes)}"


def _print_status(st: StatusResult) -> None:
    from lazyd.cli.version import describe_llfuse

    print(f"lazyd {st.version} pid {st.pid}  root {st.root}  socket {st.socket}")
    llfuse = describe_llfuse(st.llfuse_version) if st.llfuse_version else "unknown (no worker answered)"
    print(f"llfuse {llfuse}")
    rows = []
    for m in st.mounts:
        ly = m.layer
        rows.append([m.mountpoint, m.layer_state, m.state, m.layer_digest[:19], human_bytes(ly.layer_size),
                     human_bytes(ly.fetched_bytes), _pct(ly.fetched_bytes, ly.layer_size),
                     human_bytes(ly.demand_bytes), human_bytes(ly.prefetch_bytes), human_bytes(ly.background_bytes),
                     m.cache_hits, m.cache_misses, ly.in_flight, ly.registry_requests, m.worker_pid,
                     _profile_cell(m), m.error or ""])
    headers = ["MOUNTPOINT", "STATE", "MOUNT", "LAYER", "SIZE", "FETCHED", "PCT", "DEMAND", "PREFETCH", "BACKGROUND",
               "HITS", "MISSES", "INFLIGHT", "REQUESTS", "PID", "PROFILE", "ERROR"]
    for local in st.local_layers:  # promoted layers lazyd no longer mounts (SIZE: their disk use)
        row = ["-", local.state, "-", local.layer_digest[:19], human_bytes(local.disk_bytes)]
        rows.append(row + ["-"] * (len(headers) - len(row) - 1) + [""])
    print_table(headers, rows)
    print()
    print_table(["WORKER", "PID", "STATE", "MOUNTS", "RESTARTS", "LLFUSE", "NO_OPEN"],
                [[w.worker_id, w.pid, w.state, w.mounts, w.restarts, w.llfuse_version or "-",
                  "-" if w.no_open is None else ("yes" if w.no_open else "no")] for w in st.workers])
    t = st.totals
    print()
    print(f"registry: {t.registry_requests} requests, {human_bytes(t.registry_bytes)} received, "
          f"{t.in_flight} in flight; fetched {human_bytes(t.fetched_bytes)} (demand {human_bytes(t.demand_bytes)}, "
          f"prefetch {human_bytes(t.prefetch_bytes)}, background {human_bytes(t.background_bytes)}); "
          f"verify errors {t.verify_errors}; fallbacks {t.fallbacks}")
    c = st.cache
    print(f"cache: {human_bytes(c.size)} of {human_bytes(c.limit)} ({_pct(c.size, c.limit)}), {c.count} chunks, "
          f"{c.directory}")


def _status(args: argparse.Namespace) -> int:
    def run(client: Client) -> None:
        st = client.status()
        if args.json:
            print_json(st.to_dict())
        else:
            _print_status(st)
    return _call(args, run)


def _mount(args: argparse.Namespace) -> int:
    def run(client: Client) -> None:
        r = client.mount(args.ref, args.layer_digest, os.path.abspath(args.mountpoint), args.toc_digest,
                         False if args.no_prefetch_wait else None)
        if args.json:
            print_json(r.to_dict())
        else:
            print_table(["MOUNT ID", "TOC DIGEST", "SIZE", "WORKER PID"],
                        [[r.mount_id, r.toc_digest, human_bytes(r.layer_size), r.worker_pid]])
    return _call(args, run)


def _umount(args: argparse.Namespace) -> int:
    return _call(args, lambda client: client.unmount(os.path.abspath(args.mountpoint)))


def _check(args: argparse.Namespace) -> int:
    def run(client: Client) -> int:
        r = client.check(os.path.abspath(args.mountpoint))
        if args.json:
            print_json(r.to_dict())
        else:
            print_table(["SERVED", "REGISTRY", "STATE", "ERROR"],
                        [[r.served, "reachable" if r.registry_reachable else "unreachable", r.state, r.error or ""]])
        return 0 if r.served and r.registry_reachable else 1
    return _call(args, run)


def _cache(args: argparse.Namespace) -> int:
    def run(client: Client) -> None:
        c = client.cache(args.action, args.layer_digest)
        if args.json:
            print_json(c.to_dict())
            return
        rows = [[human_bytes(c.size), human_bytes(c.limit), _pct(c.size, c.limit), c.count, c.directory]]
        print_table(["SIZE", "LIMIT", "USED", "CHUNKS", "DIRECTORY"], rows)
        if c.evicted is not None:
            print(f"evicted {c.evicted} chunks")
    return _call(args, run)


def _shutdown(args: argparse.Namespace) -> int:
    return _call(args, lambda client: client.shutdown())
