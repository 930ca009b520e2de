"""containerd client used by ``lazyctl rpull`` (gRPC; the stubs load with ``.client``)."""

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
