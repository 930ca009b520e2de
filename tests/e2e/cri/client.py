"""A small CRI v1 ImageService client over containerd's socket (what the kubelet calls)."""

from __future__ import annotations

import grpc

from . import api_pb2, api_pb2_grpc


class CRIImageClient:
    """``PullImage`` / ``ImageStatus`` / ``RemoveImage`` on ``runtime.v1.ImageService``."""

    def __init__(self, address: str, timeout: float = 300.0) -> None:
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self._stub = api_pb2_grpc.ImageServiceStub(self._channel)

    def __enter__(self) -> "CRIImageClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def pull(self, image: str) -> str:
        """Pull ``image`` as the kubelet would for a pod; returns the image ref (ID) CRI reports."""
        sandbox = api_pb2.PodSandboxConfig(
            metadata=api_pb2.PodSandboxMetadata(name="e2e", uid="e2e-uid", namespace="default", attempt=0))
        req = api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image), sandbox_config=sandbox)
        return self._stub.PullImage(req, timeout=self.timeout).image_ref

    def status(self, image: str) -> api_pb2.Image | None:
        resp = self._stub.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=image)),
                                      timeout=self.timeout)
        return resp.image if resp.HasField("image") else None

    def remove(self, image: str) -> None:
        self._stub.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=self.timeout)
