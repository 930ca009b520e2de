"""The containerd API stubs this client uses (generated into lazyd.proto by scripts/gen_protos.py)."""

from types import SimpleNamespace

from lazyd.proto.containerd.services.content.v1 import content_pb2 as content
from lazyd.proto.containerd.services.content.v1 import content_pb2_grpc as content_grpc
from lazyd.proto.containerd.services.diff.v1 import diff_pb2 as diff
from lazyd.proto.containerd.services.diff.v1 import diff_pb2_grpc as diff_grpc
from lazyd.proto.containerd.services.images.v1 import images_pb2 as images
from lazyd.proto.containerd.services.images.v1 import images_pb2_grpc as images_grpc
from lazyd.proto.containerd.services.leases.v1 import leases_pb2 as leases
from lazyd.proto.containerd.services.leases.v1 import leases_pb2_grpc as leases_grpc
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2 as snapshots
from lazyd.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as snapshots_grpc
from lazyd.proto.containerd.types import descriptor_pb2, mount_pb2

types = SimpleNamespace(Descriptor=descriptor_pb2.Descriptor, Mount=mount_pb2.Mount)

__all__ = ["content", "content_grpc", "diff", "diff_grpc", "images", "images_grpc", "leases", "leases_grpc",
           "snapshots", "snapshots_grpc", "types"]
