"""``lazyctl profile``: prefetch profiles that speed up an image without rebuilding it (docs/profiles.md).

``record`` runs a workload once and stores what it read in lazyd's state, keyed by the image's
manifest digest; ``push``/``pull`` move a profile to and from the registry as an OCI artifact
that refers to the image; ``import`` stores a record file (``ctr-remote``'s ``--record-out``, or
``lazyctl image optimize --record-out``); ``list``, ``show`` and ``delete`` inspect the store.
lazyctl never writes lazyd's root itself: every change goes through lazyd's socket.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any

from lazyd.cli.args import path_arg, registry_config
from lazyd.cli.lazyctl import DEFAULT_SOCKET
from lazyd.cli.output import fail, human_bytes, print_json, print_table
from lazyd.cli.image_cmd import add_registry_args
from lazyd.cli.registry import add_global
from lazyd.cli.workload_args import WorkloadUsageError, add_workload_args, workload_from_args

if TYPE_CHECKING:
    from lazyd.registry import Reference

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")


def _common(p: argparse.ArgumentParser, registry: bool = False) -> None:
    add_global(p, "socket", default=DEFAULT_SOCKET, help="lazyd's API socket")
    add_global(p, "json", default=False, help="one JSON document for scripts")
    if registry:
        p.add_argument("--plain-http", action="store_true", help="allow plain HTTP for the image's registry")
        add_registry_args(p)


def register(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001
    """Add ``profile record|push|pull|import|list|show|delete``."""
    profile = sub.add_parser("profile", help="prefetch profiles (speed up an image without rebuilding it)")
    psub = profile.add_subparsers(dest="profile_command", metavar="SUBCOMMAND")
    psub.required = True

    p = psub.add_parser("record", help="run a workload once and store the files it reads as REF's profile",
                        description="Run the workload once in a container (containerd + runc) on traced lazy "
                                    "mounts of REF's layers, and store the files it opened, per layer and in "
                                    "first-access order, as the prefetch profile of REF's manifest.")
    p.add_argument("ref", metavar="REF", help="eStargz image reference")
    add_workload_args(p, "also write the records to FILE")
    add_global(p, "address", default=None, help="containerd's socket (default $CONTAINERD_ADDRESS or "
                                                "/run/containerd/containerd.sock)")
    _common(p, registry=True)
    p.set_defaults(func=_record)

    p = psub.add_parser("push", help="publish REF's stored profile to the registry, referring to the image")
    p.add_argument("ref", metavar="REF", help="image reference (the profile goes to its repository)")
    _common(p, registry=True)
    p.set_defaults(func=_push)

    p = psub.add_parser("pull", help="fetch the newest profile of REF from the registry and store it")
    p.add_argument("ref", metavar="REF", help="image reference")
    _common(p, registry=True)
    p.set_defaults(func=_pull)

    p = psub.add_parser("import", help="store a record file (JSON lines) as REF's profile")
    p.add_argument("ref", metavar="REF", help="image reference, or its manifest digest (sha256:…)")
    p.add_argument("file", metavar="FILE", type=path_arg, help="records: ctr-remote's or lazyctl's --record-out")
    _common(p, registry=True)
    p.set_defaults(func=_import)

    p = psub.add_parser("list", help="the profiles lazyd holds")
    _common(p)
    p.set_defaults(func=_list)

    p = psub.add_parser("show", help="print a stored profile's records (JSON lines)")
    p.add_argument("ref", metavar="REF", help="image reference, or its manifest digest (sha256:…)")
    _common(p, registry=True)
    p.set_defaults(func=_show)

    p = psub.add_parser("delete", help="remove a stored profile")
    p.add_argument("ref", metavar="REF", help="image reference, or its manifest digest (sha256:…)")
    _common(p, registry=True)
    p.set_defaults(func=_delete)


# -- helpers ---------------------------------------------------------------------------


class _Failed(Exception):
    """A user-facing failure: the message is printed, the command exits with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _parse_ref(text: str) -> Reference:
    from lazyd.registry import Reference, RegistryError

    try:
        return Reference.parse(text)
    except (RegistryError, ValueError) as exc:
        raise _Failed(str(exc), 2) from None


def _manifest_digest(args: argparse.Namespace) -> str:
    """REF's platform manifest digest (resolved in the registry), or REF itself when it is one."""
    if _DIGEST_RE.match(args.ref):
        return str(args.ref)
    import asyncio

    from lazyd.profile.artifact import subject_of
    from lazyd.registry import RegistryClient, RegistryError

    ref = _parse_ref(args.ref)

    async def resolve() -> str:
        async with RegistryClient(registry_config(args, ref.registry)) as client:
            return (await subject_of(client, ref)).digest

    try:
        return asyncio.run(resolve())
    except RegistryError as exc:
        raise _Failed(f"resolving {ref}: {exc}") from None


def _daemon(args: argparse.Namespace, op: str, body: dict[str, Any] | None = None) -> Any:
    from lazyd.api.client import Client
    from lazyd.api.messages import ApiError

    try:
        with Client(args.socket, timeout=120.0, connect_timeout=2.0) as client:
            return client.request(op, body)
    except ApiError as exc:
        raise _Failed(f"{exc.code}: {exc.message}") from None


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(fn(args) or 0)
    except _Failed as exc:
        return fail(str(exc), exc.code)


def _put(args: argparse.Namespace, digest: str, data: bytes) -> Any:
    return _daemon(args, "profile_put", {"manifest_digest": digest, "records": data})


def _summary_json(s: Any) -> dict[str, Any]:
    return {"manifest_digest": s.manifest_digest, "size": s.size, "records": s.records, "layers": s.layers,
            "stored_at": s.stored_at}


# -- commands --------------------------------------------------------------------------


def _record(args: argparse.Namespace) -> int:
    return _run(_do_record, args)


def _do_record(args: argparse.Namespace) -> int:
    import asyncio

    from lazyd.profile import records as rec
    from lazyd.profile.workload import WorkloadError, WorkloadFailed, record_workload

    try:
        workload = workload_from_args(args)
    except WorkloadUsageError as exc:
        raise _Failed(str(exc), 2) from None

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr)

    try:
        recorded = asyncio.run(record_workload(args.ref, workload, socket=args.socket, plain_http=args.plain_http,
                                               hosts_dir=args.hosts_dir, progress=say, address=args.address))
    except WorkloadFailed as exc:
        raise _Failed(str(exc)) from None
    except WorkloadError as exc:
        raise _Failed(f"cannot record a profile of {args.ref}: {exc}") from None
    data = rec.dumps(recorded.records).encode()
    if args.record_out is not None:
        try:
            args.record_out.write_bytes(data)
        except OSError as exc:
            raise _Failed(f"cannot write {args.record_out}: {exc.strerror}") from None
    summary = _put(args, recorded.manifest_digest, data)
    per_layer = rec.by_layer(recorded.records, recorded.manifest_digest)
    if args.json:
        print_json({**_summary_json(summary), "exit_code": recorded.exit_code, "stopped": recorded.stopped,
                    "files_per_layer": {str(i): len(p) for i, p in sorted(per_layer.items())}})
        return 0
    print(f"recorded {len(recorded.records)} file(s) in {len(per_layer)} of {len(recorded.layers)} layer(s) "
          f"({'stopped after the period' if recorded.stopped else f'exit code {recorded.exit_code}'}); "
          f"stored as the profile of {recorded.manifest_digest}")
    return 0


def _push(args: argparse.Namespace) -> int:
    return _run(_do_push, args)


def _do_push(args: argparse.Namespace) -> int:
    import asyncio

    from lazyd.profile import artifact
    from lazyd.registry import RegistryClient, RegistryError

    ref = _parse_ref(args.ref)

    async def go() -> tuple[artifact.PushResult, int]:
        async with RegistryClient(registry_config(args, ref.registry)) as client:
            subject = await artifact.subject_of(client, ref)
            data: bytes = _daemon(args, "profile_get", {"manifest_digest": subject.digest}).records
            return await artifact.push(client, ref, data, subject), len(data)

    try:
        result, size = asyncio.run(go())
    except (RegistryError, artifact.ArtifactError) as exc:
        raise _Failed(f"pushing the profile of {ref}: {exc}") from None
    if args.json:
        print_json({"artifact_digest": result.digest, "subject": result.subject, "method": result.method,
                    "tag": result.tag, "size": size, "repository": ref.name})
        return 0
    how = ("the registry's referrers API" if result.method == "referrers-api"
           else f"the referrers tag {ref.name}:{result.tag}")
    print(f"pushed profile {ref.name}@{result.digest} ({human_bytes(size)}) for {result.subject}, listed by {how}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    return _run(_do_pull, args)


def _do_pull(args: argparse.Namespace) -> int:
    import asyncio

    from lazyd.profile import artifact
    from lazyd.registry import RegistryClient, RegistryError

    ref = _parse_ref(args.ref)

    async def go() -> artifact.PulledProfile:
        async with RegistryClient(registry_config(args, ref.registry)) as client:
            subject = await artifact.subject_of(client, ref)
            return await artifact.pull(client, ref, subject.digest)

    try:
        pulled = asyncio.run(go())
    except (RegistryError, artifact.ArtifactError) as exc:
        raise _Failed(f"pulling the profile of {ref}: {exc}") from None
    summary = _put(args, pulled.manifest_digest, pulled.data)
    if args.json:
        print_json({**_summary_json(summary), "artifact_digest": pulled.artifact_digest, "created": pulled.created,
                    "method": pulled.method})
        return 0
    print(f"pulled profile {ref.name}@{pulled.artifact_digest} (created {pulled.created or '?'}, "
          f"{pulled.records} records) via {pulled.method}; stored for {pulled.manifest_digest}")
    return 0


def _import(args: argparse.Namespace) -> int:
    return _run(_do_import, args)


def _do_import(args: argparse.Namespace) -> int:
    from lazyd.profile.store import MAX_PROFILE_BYTES

    try:
        size = args.file.stat().st_size
        if size > MAX_PROFILE_BYTES:
            raise _Failed(f"{args.file}: {size} bytes, more than the {MAX_PROFILE_BYTES} a profile may hold")
        data = args.file.read_bytes()
    except OSError as exc:
        raise _Failed(f"cannot read {args.file}: {exc.strerror}") from None
    summary = _put(args, _manifest_digest(args), data)
    if args.json:
        print_json(_summary_json(summary))
    else:
        print(f"stored {summary.records} record(s) ({summary.layers} layer(s)) as the profile of "
              f"{summary.manifest_digest}")
    return 0


def _list(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        result = _daemon(args, "profile_list")
        if args.json:
            print_json({"profiles": [_summary_json(s) for s in result.profiles]})
            return 0
        import time

        print_table(["MANIFEST", "RECORDS", "LAYERS", "SIZE", "STORED"],
                    [[s.manifest_digest, s.records, s.layers, human_bytes(s.size),
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.stored_at))] for s in result.profiles])
        return 0
    return _run(go, args)


def _show(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        from lazyd.profile import records as rec

        digest = _manifest_digest(args)
        data: bytes = _daemon(args, "profile_get", {"manifest_digest": digest}).records
        if args.json:
            records = rec.loads(data.decode("utf-8"), f"profile of {digest}")
            print_json({"manifest_digest": digest, "records": [r.to_json() for r in records]})
        else:
            sys.stdout.write(data.decode("utf-8"))
        return 0
    return _run(go, args)


def _delete(args: argparse.Namespace) -> int:
    def go(args: argparse.Namespace) -> int:
        digest = _manifest_digest(args)
        _daemon(args, "profile_delete", {"manifest_digest": digest})
        if not args.json:
            print(f"deleted the profile of {digest}")
        else:
            print_json({"deleted": digest})
        return 0
    return _run(go, args)
