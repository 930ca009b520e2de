"""Credentials on the CRI path: what kubelet passes in ``PullImage`` reaches containerd, not lazyd.

A private image (htpasswd registry) is pulled through containerd's CRI plugin with the
credentials in ``PullImageRequest.auth``, as the kubelet sends a pod's imagePullSecrets:

* lazyd without credentials of its own for that registry: every layer falls back (lazyd
  reports ``unauthorized``) and containerd downloads it with the kubelet's credentials,
  so the pod still starts, just not lazily;
* lazyd with node credentials (docker ``config.json``, ``[registry] docker_config``): the
  layers are mounted lazily and containerd downloads none.

docs/kubernetes.md draws the conclusion (a CRI image-service proxy is a next step).
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.e2e.cri import api_pb2, api_pb2_grpc
from tests.e2e.images import convert_layout, lazyd_builder, manifest_of
from tests.support.images import build_busybox, push
from tests.support.lazyd import start_lazyd
from tests.support.registry import Registry, running_registry

from .conftest import Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

USER = "kubelet-pull-user"
PASSWORD = "Pull-Secret-7c41"


@dataclass(frozen=True)
class PrivateImage:
    registry: Registry
    ref: str
    layers: set[str]


@pytest.fixture(scope="module")
def private_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateImage]:
    """busybox (2 layers) as eStargz in a registry that requires basic auth."""
    work = tmp_path_factory.mktemp("cri-creds")
    htpasswd = work / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", str(htpasswd), USER, PASSWORD], check=True, capture_output=True)
    build_busybox(work / "busybox", "latest", with_deletions=True)
    src = convert_layout(work / "busybox", "latest", work / "busybox-esgz", lazyd_builder)
    _, manifest = manifest_of(work / "busybox-esgz", "latest")
    with running_registry(work, name="private", auth={"htpasswd": {"realm": "cri", "path": str(htpasswd)}}) as reg:
        ref = push(src, reg.host, "private/busybox:esgz", dest_creds=f"{USER}:{PASSWORD}")
        yield PrivateImage(reg, ref, {layer["digest"] for layer in manifest["layers"]})


@dataclass
class NodeCredsStack(Stack):
    """A CRI stack whose lazyd reads ``docker_config`` (and never the test runner's ~/.docker)."""

    docker_config: Path | None = None

    def start_lazyd(self) -> None:
        assert self.docker_config is not None
        config = self.root / "lazyd.toml"
        config.write_text(f'[registry]\ndocker_config = "{self.docker_config}"\n')
        self.lazyd = start_lazyd(self.root / "lazyd", self.lazyd_socket, self.root / "lazyd.log", config=config)


def cri_pull_with_auth(address: str, ref: str) -> str:
    """``PullImage`` with the credentials in ``auth``, as the kubelet sends a pod's pull secret."""
    with grpc.insecure_channel(f"unix://{address}") as channel:
        stub = api_pb2_grpc.ImageServiceStub(channel)
        sandbox = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="creds", uid="creds-uid", namespace="default", attempt=0))
        req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref), sandbox_config=sandbox,
                                       auth=api_pb2.AuthConfig(username=USER, password=PASSWORD))
        return stub.PullImage(req, timeout=300).image_ref


@pytest.mark.parametrize("node_creds", [False, True], ids=["pull-secret-only", "node-credentials"])
def test_cri_credentials_reach_containerd_not_lazyd(tmp_path: Path, private_image: PrivateImage,
                                                    node_creds: bool) -> None:
    docker_config = tmp_path / "docker-config.json"
    auths = {private_image.registry.host: {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}
    docker_config.write_text(json.dumps({"auths": auths if node_creds else {}}))
    stack = NodeCredsStack(tmp_path / "stack", cri=True, docker_config=docker_config)
    try:
        stack.start()
        assert cri_pull_with_auth(stack.address, private_image.ref)
        downloaded = private_image.layers & stack.content_digests("k8s.io")
        status = stack.status()
        fallbacks = [f for f in status["fallbacks"] if f["layer_digest"] in private_image.layers]
        if node_creds:
            assert not downloaded, "containerd downloaded layers lazyd could have mounted"
            assert not fallbacks, fallbacks
            assert {m["layer_digest"] for m in status["mounts"]} == private_image.layers
        else:
            assert downloaded == private_image.layers, "the layers lazyd could not mount were not downloaded"
            assert {f["layer_digest"] for f in fallbacks} == private_image.layers, fallbacks
            assert all("unauthorized" in f["reason"] for f in fallbacks), fallbacks
            assert not status["mounts"], status["mounts"]
        out = stack.run(private_image.ref, "creds", "/bin/cat", "/etc/hello.txt", namespace="k8s.io")
        assert out.stdout == "hello from lazyd\n"
    finally:
        stack.close()
