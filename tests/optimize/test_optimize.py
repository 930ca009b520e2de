"""``lazyctl image optimize``: the profile is exactly what the workload opened, the optimized image
needs no on-demand fetch, and failing or long workloads are handled (real registry, lazyd,
containerd, runc; strace as the independent witness)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lazyd.estargz import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, open_file
from lazyd.profile import records as rec
from lazyd.profile.workload import Workload, WorkloadFailed, record_workload
from tests.e2e.conftest import Stack
from tests.support.images import layer_tars
from tests.support.registry import Registry

from .conftest import PY_CMD, OptImages, Optimized, lazyctl

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
RUNC_OPENS = ("etc/passwd", "etc/group")  # runc's init reads them in the container to set up the user


# -- helpers ------------------------------------------------------------------------


def manifest(registry: Registry, ref: str) -> dict[str, Any]:
    repo_tag = ref.split("/", 1)[1]
    repo, _, tag = repo_tag.rpartition(":")
    req = urllib.request.Request(f"{registry.url}/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": f"{OCI_MANIFEST},application/vnd.docker.distribution.manifest.v2+json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def prioritized_files(registry: Registry, layer_digest: str) -> tuple[list[str], str]:
    """Regular files before the landmark of a pushed eStargz layer, and the landmark's kind."""
    with open_file(registry.blob_path(layer_digest)) as reader:
        entries = [e for e in reader.toc.entries if e.type != "chunk"]
    names = [e.name for e in entries]
    if NO_PREFETCH_LANDMARK in names:
        return [], "no-prefetch"
    assert PREFETCH_LANDMARK in names, f"layer {layer_digest} has no landmark"
    end = names.index(PREFETCH_LANDMARK)
    return [e.name for e in entries[:end] if e.type == "reg"], "prefetch"


def resolve_in(root: Path, path: str, cwd: str = "/") -> str | None:
    """``path`` with every symlink resolved inside ``root`` (as the chrooted process saw it), root-relative."""
    todo = [p for p in (path if path.startswith("/") else f"{cwd}/{path}").split("/") if p]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if here.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        done.append(part)
    return "/".join(done)


def elf_interpreter(path: Path) -> str | None:
    """PT_INTERP of a 64-bit little-endian ELF file (the dynamic loader execve opens), or None."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return None
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p_type, _, p_offset, _, _, p_filesz = struct.unpack("<IIQQQQ", f.read(40))
            if p_type == 3:
                f.seek(p_offset)
                return f.read(p_filesz).rstrip(b"\0").decode()
    return None


_CALL = re.compile(r'^(?:\[pid\s+)?(\d+)\]?\s+(\w+)\((?:AT_FDCWD, )?"((?:[^"\\]|\\.)*)".*\)\s+=\s+(-?\d+)')


def strace_opens(rootfs: Path, argv: list[str], env: dict[str, str], out: Path) -> list[str]:
    """Root-relative regular files ``argv`` opened or executed, chrooted in ``rootfs``, first-open order.

    Includes each executed binary's ELF interpreter, which the kernel opens without a system call.
    """
    subprocess.run(["strace", "-f", "-qq", "-s", "4096", "-o", str(out), "-e", "trace=open,openat,execve,chroot",
                    "chroot", str(rootfs), *argv], env=env, cwd="/", check=True, capture_output=True, timeout=120)
    seen: list[str] = []
    chrooted = False
    for line in out.read_text().splitlines():
        m = _CALL.match(line.replace("<unfinished ...>", ") = -99"))
        if m is None:
            continue
        _, call, path, result = m.groups()
        if call == "chroot":
            chrooted = chrooted or int(result) == 0
            continue
        if not chrooted or int(result) < 0:
            continue
        resolved = resolve_in(rootfs, path.encode().decode("unicode_escape"))
        if resolved is None or not (rootfs / resolved).is_file() or (rootfs / resolved).is_symlink():
            continue
        found = [resolved]
        if call == "execve":
            interp = elf_interpreter(rootfs / resolved)
            if interp:
                found.append(resolve_in(rootfs, interp) or interp)
        for f in found:
            if f not in seen:
                seen.append(f)
    return seen


def layer_files(tars: list[Path]) -> list[set[str]]:
    """Regular files (and hard links) of each layer tar, root-relative."""
    out = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            out.append({"/".join(p for p in m.name.split("/") if p not in ("", "."))
                        for m in tf if m.isreg() or m.islnk()})
    return out


def layer_counters(status: dict[str, Any], digests: list[str]) -> dict[str, dict[str, Any]]:
    by_digest = {m["layer_digest"]: m["layer"] for m in status["mounts"]}
    return {d: by_digest[d] for d in digests if d in by_digest}


# -- tests --------------------------------------------------------------------------


def test_profile_is_exactly_what_the_workload_opened(optimized: Optimized, opt_images: OptImages,
                                                     opt_registry: Registry, tmp_path: Path) -> None:
    summary = optimized.summary
    assert summary["profile"]["converted_source"] is True  # the umoci image is plain gzip
    assert summary["profile"]["exit_code"] == 0 and not summary["profile"]["stopped"]
    pushed = manifest(opt_registry, optimized.ref)
    layers = [layer["digest"] for layer in pushed["layers"]]
    assert [layer["digest"] for layer in summary["layers"]] == layers
    got = [prioritized_files(opt_registry, d) for d in layers]

    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{opt_images.layout}:latest", str(bundle)], check=True,
                   capture_output=True, timeout=300)
    rootfs = bundle / "rootfs"
    per_layer = layer_files(layer_tars(opt_images.layout, "latest", tmp_path / "tars"))
    opened = strace_opens(rootfs, PY_CMD, {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                           "HOME": "/root"}, tmp_path / "strace.out")
    expected: list[list[str]] = [[] for _ in layers]
    for path in [*RUNC_OPENS, *opened]:
        owners = [i for i, files in enumerate(per_layer) if path in files]
        if owners and path not in expected[owners[-1]]:
            expected[owners[-1]].append(path)
    print(f"\noptimize took {optimized.seconds:.1f}s (profile {summary['profile']['seconds']:.1f}s, "
          f"workload {summary['profile']['run_seconds']:.1f}s); prioritized per layer: "
          f"{[len(files) for files, _ in got]}; strace saw {len(opened)} files")
    assert sum(map(len, expected)) > 50
    for i, (files, landmark) in enumerate(got):
        assert landmark == ("prefetch" if expected[i] else "no-prefetch")
        assert files == expected[i], (f"layer {i}: only in the image's list {sorted(set(files) - set(expected[i]))}, "
                                      f"only in strace's {sorted(set(expected[i]) - set(files))}")
        assert summary["layers"][i]["prioritized"] == len(files) and summary["layers"][i]["missing"] == []
    # python3 lives in the upper layer, which umoci wrote without its parent directories.
    assert "usr/bin/python3.11" in got[1][0]
    records = rec.load(optimized.record)
    assert {r.manifest_digest for r in records} == {summary["source_manifest"]}
    in_image = [p for p in dict.fromkeys([*RUNC_OPENS, *opened]) if any(p in files for files in per_layer)]
    assert [r.path for r in records] == in_image, "the record is in first-open order across the layers"
    assert rec.by_layer(records) == {i: files for i, (files, _) in enumerate(got) if files}


def _cold_run(root: Path, ref: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any], str, float]:
    """rpull + ``ctr run`` of PY_CMD on a fresh lazyd stack: per-layer counters, totals, output, seconds."""
    s = Stack(root, config={"prefetch_wait": True, "background_fetch": False})
    try:
        s.start()
        started = time.monotonic()
        pulled = s.rpull(ref)
        out = s.run(ref, "opt-run", PY_CMD[0], PY_CMD[1], PY_CMD[2] + "; print('ran')")
        took = time.monotonic() - started
        assert all(layer["mode"] == "lazy" for layer in pulled["layers"]), pulled
        status = s.status()
        return layer_counters(status, [layer["digest"] for layer in pulled["layers"]]), status["totals"], \
            out.stdout, took
    finally:
        s.close()


def test_optimized_image_needs_nothing_on_demand(optimized: Optimized, opt_images: OptImages,
                                                 tmp_path: Path) -> None:
    layers, totals, out, took = _cold_run(tmp_path / "optimized", optimized.ref)
    assert out.strip() == "ran"
    assert len(layers) == 2
    for digest, c in layers.items():
        assert c["demand_bytes"] == 0, f"layer {digest} was read on demand: {c}"
        assert c["prefetch_state"] == "done" and c["prefetch_bytes"] > 0, c
    base_layers, base_totals, base_out, base_took = _cold_run(tmp_path / "unprioritized", opt_images.debian_esgz)
    assert base_out.strip() == "ran"
    assert sum(c["demand_bytes"] for c in base_layers.values()) > 0
    print(f"\noptimized: {totals['registry_requests']} registry requests, {totals['registry_bytes']} bytes "
          f"(prefetch {totals['prefetch_bytes']}, demand {totals['demand_bytes']}), {took:.2f}s; "
          f"unprioritized: {base_totals['registry_requests']} requests, {base_totals['registry_bytes']} bytes "
          f"(prefetch {base_totals['prefetch_bytes']}, demand {base_totals['demand_bytes']}), {base_took:.2f}s")


def test_failing_workload_is_an_error_with_its_exit_code_and_output(opt_stack: Stack, opt_images: OptImages) -> None:
    proc = lazyctl("image", "optimize", "--plain-http", "--socket", str(opt_stack.lazyd_socket),
                   "--address", opt_stack.address, "--entrypoint", '["sh"]',
                   "--args", json.dumps(["-c", "echo about to fail; exit 3"]), opt_images.debian_esgz,
                   opt_images.debian_esgz.rsplit(":", 1)[0] + ":never", check=False)
    assert proc.returncode == 1, proc
    assert "exit code 3" in proc.stderr and "about to fail" in proc.stderr, proc.stderr
    with pytest.raises(WorkloadFailed) as info:
        asyncio.run(record_workload(opt_images.debian_esgz, Workload(entrypoint=["/no/such/binary"]),
                                    socket=str(opt_stack.lazyd_socket), plain_http=True, address=opt_stack.address))
    assert info.value.exit_code != 0 and "/no/such/binary" in str(info.value)
    status = opt_stack.status()
    assert not [m for m in status["mounts"] if "lazyd-optimize-" in m["mountpoint"]]  # all cleaned up
    assert not [w for w in status["workers"] if w["state"] == "tracing"]


def test_period_stops_the_workload_and_keeps_what_it_opened(opt_stack: Stack, opt_images: OptImages) -> None:
    started = time.monotonic()
    prof = asyncio.run(record_workload(opt_images.debian_esgz, Workload(entrypoint=["sleep"], args=["30"], period=1),
                                       socket=str(opt_stack.lazyd_socket), plain_http=True,
                                       address=opt_stack.address))
    took = time.monotonic() - started
    assert prof.stopped and 1.0 <= prof.run_seconds < 4.0, prof.run_seconds
    assert took < 15, took
    paths = {r.path for r in prof.records}
    assert "usr/bin/sleep" in paths and all(r.layer_index == 0 for r in prof.records if r.path == "usr/bin/sleep")
    assert prof.layers and all(r.manifest_digest == prof.manifest_digest for r in prof.records)


def test_network_is_off_by_default(opt_stack: Stack, opt_images: OptImages) -> None:
    script = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    quiet = asyncio.run(record_workload(opt_images.debian_esgz, Workload(entrypoint=["python3"], args=["-c", script]),
                                        socket=str(opt_stack.lazyd_socket), plain_http=True,
                                        address=opt_stack.address))
    assert quiet.output.strip() == "['lo']", quiet.output
    host = asyncio.run(record_workload(opt_images.debian_esgz, Workload(entrypoint=["python3"], args=["-c", script],
                                                                        network=True),
                                       socket=str(opt_stack.lazyd_socket), plain_http=True,
                                       address=opt_stack.address))
    assert json.loads(host.output.strip().replace("'", '"')) == sorted(n for _, n in socket.if_nameindex())


def test_prioritized_only_refuses_a_record_for_another_image(optimized: Optimized, opt_images: OptImages,
                                                              tmp_path: Path) -> None:
    proc = lazyctl("image", "optimize", "--plain-http", "--prioritized-only", str(optimized.record),
                   opt_images.debian_esgz, opt_images.debian_esgz.rsplit(":", 1)[0] + ":never", check=False)
    assert proc.returncode == 1
    src_manifest = optimized.summary["source_manifest"]
    assert src_manifest in proc.stderr and "sha256:" in proc.stderr.replace(src_manifest, ""), proc.stderr


def test_interrupt_stops_the_workload_and_cleans_up(opt_stack: Stack, opt_images: OptImages) -> None:
    import signal
    import tempfile

    from tests.support.procs import wait_until

    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("lazyd-optimize-*"))
    cd = opt_stack.containerd
    proc = subprocess.Popen(["lazyctl", "image", "optimize", "--plain-http", "--socket", str(opt_stack.lazyd_socket),
                             "--address", opt_stack.address, "--entrypoint", '["sleep"]', "--args", '["60"]',
                             "--period", "60", opt_images.debian_esgz,
                             opt_images.debian_esgz.rsplit(":", 1)[0] + ":never"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: bool(cd.ctr("tasks", "ls", "-q", namespace="lazyd-optimize").stdout.strip())
                   or proc.poll() is not None, 60, "the workload to run")
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not cd.ctr("containers", "ls", "-q", namespace="lazyd-optimize").stdout.strip()
    status = opt_stack.status()
    assert not [m for m in status["mounts"] if "lazyd-optimize-" in m["mountpoint"]], status["mounts"]
    assert not [w for w in status["workers"] if w["state"] == "tracing"]
    assert set(tmp.glob("lazyd-optimize-*")) == before, err
    with open("/proc/self/mountinfo") as f:
        assert "lazyd-optimize-" not in f.read()


def test_own_record_rebuilds_the_same_layers(optimized: Optimized, opt_images: OptImages,
                                             opt_registry: Registry) -> None:
    """``--prioritized-only`` with our own record gives the same layers (human output: the table)."""
    dst = opt_images.debian_plain.rsplit(":", 1)[0] + ":from-record"
    out = lazyctl("image", "optimize", "--plain-http", "--prioritized-only", str(optimized.record),
                  opt_images.debian_plain, dst).stdout
    print("\n" + out)
    lines = out.splitlines()
    assert lines[0].split() == ["LAYER", "SOURCE", "DIGEST", "PRIORITIZED", "MISSING", "LANDMARK"]
    rows = [line.split() for line in lines[2:4]]
    assert [(r[0], r[3], r[4], r[5]) for r in rows] == [
        (str(i), str(layer["prioritized"]), "0", "prefetch") for i, layer in enumerate(optimized.summary["layers"])]
    assert f"from {optimized.record}" in out and lines[-1].startswith(f"pushed {dst}@sha256:")
    assert [layer["digest"] for layer in manifest(opt_registry, dst)["layers"]] == \
        [layer["digest"] for layer in optimized.summary["layers"]]


def test_missing_lazyd_or_containerd_is_a_clear_error(opt_stack: Stack, opt_images: OptImages,
                                                      tmp_path: Path) -> None:
    dst = opt_images.debian_plain.rsplit(":", 1)[0] + ":never"
    no_lazyd = lazyctl("image", "optimize", "--plain-http", "--socket", str(tmp_path / "none.sock"),
                       "--address", opt_stack.address, opt_images.debian_plain, dst, check=False)
    assert no_lazyd.returncode == 1 and f"lazyd is not running: no socket at {tmp_path / 'none.sock'}" \
        in no_lazyd.stderr, no_lazyd.stderr
    no_containerd = lazyctl("image", "optimize", "--plain-http", "--socket", str(opt_stack.lazyd_socket),
                            "--address", str(tmp_path / "cd.sock"), opt_images.debian_plain, dst, check=False)
    assert no_containerd.returncode == 1 and "containerd is not running" in no_containerd.stderr, no_containerd.stderr
