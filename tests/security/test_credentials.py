"""Registry credentials never reach lazyd's logs (debug level), ``lazyctl`` output, error messages or state.

A real ``lazyd serve --log-level debug`` and ``lazyd snapshotter --log-level debug`` work against a
Debian ``docker-registry`` that requires credentials (htpasswd basic auth, or a token server whose
tokens are then secrets too), taken from a docker ``config.json``: lazy mounts (through lazyctl and
through the snapshotter) with reads, a wrong password, a layer the registry does not have, and reads
after the registry went away.  Then every log, every output and error message, and the state
directories are searched with grep for the password, ``user:password`` and its base64.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from aiohttp import web

from lazyd.api.messages import ApiError
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from lazyd.snapshotter import remote as labels
from tests.support.lazyd import unmount_all_below
from tests.support.procs import free_port
from tests.support.registry import Registry, start_registry

from .conftest import Stored, running_stack, write_config

USER = "lzsec-user-R7q"
PASSWORD = "Pw-9f3kZ-distinctive-S3CRET"
WRONG_PASSWORD = "Wrong-4hX2-distinctive-N0PE"
FUSE_DIRS = ("fuse",)  # FUSE roots below lazyd's root while it runs: not state, and grep would read every layer


def secret_forms(label: str, user: str, password: str) -> dict[str, str]:
    """The spellings of one credential (``label``: which one) that must never be written anywhere."""
    pair = f"{user}:{password}"
    return {f"{label} password": password, f"{label} user:password": pair,
            f"{label} base64(user:password)": base64.b64encode(pair.encode()).decode()}


@dataclass
class SecretGrep:
    """``grep -F`` for a set of secrets in strings, files and directory trees; each hit names where and which."""

    secrets: dict[str, str]

    def __post_init__(self) -> None:
        assert self.secrets and all(self.secrets.values()), "nothing to search for"

    def _args(self) -> list[str]:
        return [arg for s in self.secrets.values() for arg in ("-e", s)]

    def _names(self, matched: str) -> str:
        return ", ".join(n for n, s in self.secrets.items() if s in matched)

    def texts(self, texts: dict[str, str]) -> list[str]:
        """Hits in each of ``texts`` (label -> text)."""
        hits = []
        for label, text in texts.items():
            r = subprocess.run(["grep", "-a", "-F", "-o", *self._args()], input=text, capture_output=True, text=True)
            assert r.returncode in (0, 1), r.stderr
            hits += [f"{label}: {self._names(m)}" for m in sorted(set(r.stdout.split()))]
        return hits

    def tree(self, path: Path, exclude_dirs: tuple[str, ...] = ()) -> list[str]:
        """Hits in every file below ``path`` (``grep -r``; sockets, fifos and devices skipped)."""
        excludes = [f"--exclude-dir={d}" for d in exclude_dirs]
        r = subprocess.run(["grep", "-r", "-H", "-a", "-F", "-o", "-Z", "-D", "skip", *excludes, *self._args(), str(path)],
                           capture_output=True, text=True)
        assert r.returncode in (0, 1), r.stderr
        hits = (line.split("\0", 1) for line in r.stdout.splitlines())  # -Z: file name, NUL, match
        return [f"{name}: {self._names(match)}" for name, match in hits]


def test_secret_grep_finds_every_form(tmp_path: Path) -> None:
    """The helper the test below relies on finds each secret in text, files and trees (it can fail)."""
    grep = SecretGrep(secret_forms("good", USER, PASSWORD))
    for name, secret in grep.secrets.items():
        (hit,) = grep.texts({"control": f"x Authorization: Basic {secret}\n y"})
        assert hit.startswith("control: ") and name in hit, (name, hit)
        (tmp_path / "tree" / "a" / "fuse").mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / "a" / "log").write_text(f"line\n{secret} here\n")
        (hit,) = grep.tree(tmp_path / "tree")
        assert hit.startswith(f"{tmp_path / 'tree' / 'a' / 'log'}: ") and name in hit, (name, hit)
        (tmp_path / "tree" / "a" / "log").unlink()
        (tmp_path / "tree" / "a" / "fuse" / "x").write_text(secret)
        assert grep.tree(tmp_path / "tree") != [] and grep.tree(tmp_path / "tree", FUSE_DIRS) == []
        (tmp_path / "tree" / "a" / "fuse" / "x").unlink()
    assert grep.texts({"clean": f"{USER} was refused; password: <redacted>"}) == []


@contextmanager
def serve_app_in_thread(app: web.Application, port: int) -> Iterator[None]:
    """Serve an aiohttp app on 127.0.0.1:port from an event loop in a thread."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="token-server", daemon=True)
    thread.start()
    assert ready.wait(20), "the token server did not start"
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(20)


@contextmanager
def auth_registry(work: Path, storage: Path, scheme: str) -> Iterator[tuple[Registry, list[str]]]:
    """A registry over ``storage`` that wants ``USER``/``PASSWORD``; yields it and the tokens issued so far."""
    if scheme == "basic":
        htpasswd = work / "htpasswd"
        subprocess.run(["htpasswd", "-Bbc", str(htpasswd), USER, PASSWORD], check=True, capture_output=True)
        reg = start_registry(work, name="auth", storage_root=storage,
                             auth={"htpasswd": {"realm": "lazyd-security", "path": str(htpasswd)}})
        try:
            yield reg, []
        finally:
            reg.stop()
        return
    from tests.registry.tokenserver import TokenServer

    server = TokenServer(work, users={USER: PASSWORD})
    server.port = free_port()
    with serve_app_in_thread(server.app(), server.port):
        reg = start_registry(work, name="auth", storage_root=storage, auth=server.registry_auth())
        try:
            yield reg, server.issued
        finally:
            reg.stop()


def secrets_grep(tokens: list[str]) -> SecretGrep:
    """Both credentials in every spelling, and the bearer tokens issued so far."""
    return SecretGrep({**secret_forms("good", USER, PASSWORD), **secret_forms("wrong", USER, WRONG_PASSWORD),
                       **{f"token {i}": t for i, t in enumerate(tokens)}})


def _auth(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("scheme", ["basic", "token"])
def test_credentials_never_leak(tmp_path: Path, stored: Stored, scheme: str, log_format: str) -> None:
    image = stored.image
    with auth_registry(tmp_path, stored.storage, scheme) as (reg, tokens):
        good = f"{reg.host}/{stored.name}"
        wrong = f"localhost:{reg.port}/{stored.name}"  # the same registry, with the wrong password
        docker_config = tmp_path / "docker-config.json"
        docker_config.write_text(json.dumps({"auths": {reg.host: _auth(USER, PASSWORD),
                                                       f"localhost:{reg.port}": _auth(USER, WRONG_PASSWORD)}}))
        metrics = f"127.0.0.1:{free_port()}"
        config = write_config(tmp_path / "config.toml", tmp_path / "certs.d",
                              extra=f'background_fetch = false\nlog_format = "{log_format}"\n'
                                    f'metrics_address = "{metrics}"',
                              registry_extra=f'docker_config = "{docker_config}"')
        root, sock = tmp_path / "root", tmp_path / "run" / "lazyd.sock"
        outputs: dict[str, str] = {}

        def ctl(label: str, *args: str, ok: bool | None = True) -> subprocess.CompletedProcess[str]:
            """Run lazyctl and keep its output; ``ok``: whether it must succeed (None: either way)."""
            r = subprocess.run([sys.executable, "-m", "lazyd.cli.lazyctl", "--socket", str(sock), *args],
                               capture_output=True, text=True, timeout=120)
            outputs[f"lazyctl {label} (stdout)"] = r.stdout
            outputs[f"lazyctl {label} (stderr)"] = r.stderr
            assert ok is None or (r.returncode == 0) == ok, f"{args}: {r.returncode}\n{r.stdout}\n{r.stderr}"
            return r

        with running_stack(tmp_path, config, root, sock, tmp_path / "run" / "snapshotter.sock") as stack:
            layer0, layer1 = image.layers
            mp, mp_wrong = tmp_path / "mnt" / "l1", tmp_path / "mnt" / "wrong"
            mp.mkdir(parents=True)
            mp_wrong.mkdir()
            remote = {labels.TARGET_REF_LABEL: "default/chain-0", labels.STARGZ_REFERENCE: good,
                      labels.STARGZ_DIGEST: layer0.digest, labels.TOC_DIGEST: layer0.toc_digest}
            with grpc.insecure_channel(f"unix:{stack.address}") as ch:
                stub = pb_grpc.SnapshotsStub(ch)
                # 1. the wrong password (first: a layer lazyd already knows is mounted without asking the
                # registry again): through the snapshotter, which falls back, then lazyctl and the API
                refused = {**remote, labels.TARGET_REF_LABEL: "default/chain-wrong", labels.STARGZ_REFERENCE: wrong}
                mounts = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="lazyd", key="default/2/extract-w",
                                                                labels=refused))
                assert mounts.mounts, "a refused remote layer falls back to a normal snapshot"
                r = ctl("mount (wrong password)", "mount", wrong, layer1.digest, str(mp_wrong), ok=False)
                assert f"localhost:{reg.port}" in r.stderr and "credentials" in r.stderr, r.stderr
                with stack.lazyd.client(timeout=60) as c:
                    with pytest.raises(ApiError) as api_err:
                        c.mount(wrong, layer0.digest, str(mp_wrong), layer0.toc_digest)
                    outputs["API error (wrong password)"] = api_err.value.message
                # 2. lazy mounts with the right credentials: lazyctl for layer 1, the snapshotter for layer 0
                ctl("mount --json", "mount", good, layer1.digest, str(mp), "--json")
                assert (mp / "data" / "file.txt").read_text() == "payload\n"
                with open(mp / "data" / "big.bin", "rb") as f:
                    assert len(f.read(64 * 1024)) == 64 * 1024
                with pytest.raises(grpc.RpcError) as err:
                    stub.Prepare(pb.PrepareSnapshotRequest(snapshotter="lazyd", key="default/1/extract-0",
                                                           labels=remote))
                assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS, err.value.details()
                outputs["snapshotter Prepare (good credentials)"] = err.value.details()
                fs = next(p / "fs" for p in (stack.snapshotter_root / "snapshots").iterdir()
                          if (p / "fs" / "etc" / "hello.txt").exists())
                assert (fs / "etc" / "hello.txt").read_text() == "hello from lazyd\n"
            # 3. a registry error: a layer the registry does not have
            with stack.lazyd.client(timeout=60) as c:
                missing = "sha256:" + "e" * 64
                with pytest.raises(ApiError) as api_err:
                    c.mount(good, missing, str(mp_wrong))
                outputs["API error (missing blob)"] = api_err.value.message
                assert reg.host in api_err.value.message, api_err.value.message
                with pytest.raises(ApiError) as api_err:  # the registry answers 404 MANIFEST_UNKNOWN
                    c.mount(f"{reg.host}/secure/bb:no-such-tag", missing, str(mp_wrong))
                outputs["API error (unknown tag)"] = api_err.value.message
                assert api_err.value.code == "not_found" and "no-such-tag" in api_err.value.message
            ctl("check", "check", str(mp))
            ctl("status", "status")
            ctl("status --json", "status", "--json")
            assert str(mp) in outputs["lazyctl status (stdout)"]
            # 4. the registry goes away: a read of data not fetched yet fails, check says so
            reg.stop()
            with open(mp / "data" / "big.bin", "rb") as f:
                f.seek(9 * 1024 * 1024 - 4096)
                with pytest.raises(OSError) as read_err:
                    f.read(4096)
            assert read_err.value.errno == errno.EIO
            down = ctl("check (registry down)", "check", str(mp), "--json", ok=None)
            assert json.loads(down.stdout)["registry_reachable"] is False, down.stdout
            ctl("status --json (registry down)", "status", "--json")
            ctl("status (registry down)", "status")
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=30) as resp:
                outputs["metrics scrape"] = resp.read().decode()
            assert "lazyd_registry_errors_total" in outputs["metrics scrape"]
            # while running: the state directories (not the FUSE roots)
            running_hits = (secrets_grep(tokens).tree(root, FUSE_DIRS)
                            + secrets_grep(tokens).tree(stack.snapshotter_root, FUSE_DIRS + ("fs",)))
        unmount_all_below(tmp_path / "mnt")

    if scheme == "token":
        assert tokens, "the token server issued no token: the registry did not use token auth"
    grep = secrets_grep(tokens)
    logs = {"lazyd log": (tmp_path / "lazyd.log").read_text(errors="replace"),
            "snapshotter log": (tmp_path / "snapshotter.log").read_text(errors="replace")}
    for wlog in sorted(root.glob("workers/*/worker.log")):
        logs[str(wlog)] = wlog.read_text(errors="replace")
    # The runs really were at debug level and did hit the failures whose messages are searched.
    debug = ' DEBUG ' if log_format == "text" else '"level":"DEBUG"'
    assert debug in logs["lazyd log"] and " DEBUG" in logs["snapshotter log"]
    assert all(debug in text for name, text in logs.items() if name.endswith("worker.log")), "workers log as set"
    assert "falling back" in logs["snapshotter log"] and wrong in logs["snapshotter log"]
    assert "credentials" in outputs["API error (wrong password)"]
    # The same grep finds both credentials in the docker config.json they came from.
    control = grep.tree(docker_config)
    assert sorted(control) == [f"{docker_config}: good base64(user:password)",
                               f"{docker_config}: wrong base64(user:password)"], control
    hits = running_hits + grep.texts(logs) + grep.texts(outputs) + grep.tree(root) + grep.tree(stack.snapshotter_root)
    assert hits == [], "credentials leaked:\n" + "\n".join(hits)
