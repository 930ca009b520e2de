"""OCI distribution client: references, hosts.toml, auth, manifests, range GETs and push.

``RegistryClient`` and ``select_platform`` (and with them aiohttp, ~0.2 s to import) are
loaded on first use, so that importing ``RegistryConfig`` or ``Reference`` from here
(``lazyd snapshotter``, ``lazyctl --help``) stays cheap.
"""

from typing import TYPE_CHECKING, Any

from .config import RegistryConfig
from .errors import (DigestMismatchError, InvalidReferenceError, ManifestError, NotFoundError,
                     RangeNotSupportedError, RegistryError, ResponseTooLargeError, UnauthorizedError,
                     UnreachableError)
from .platforms import Platform
from .reference import Reference
from .types import Descriptor, Image, RegistryStats

if TYPE_CHECKING:
    from .client import RegistryClient, select_platform

_FROM_CLIENT = ("RegistryClient", "select_platform")

__all__ = [
    "Descriptor", "DigestMismatchError", "Image", "InvalidReferenceError", "ManifestError", "NotFoundError",
    "Platform", "RangeNotSupportedError", "Reference", "RegistryClient", "RegistryConfig", "RegistryError",
    "RegistryStats", "ResponseTooLargeError", "UnauthorizedError", "UnreachableError", "select_platform",
]


def __getattr__(name: str) -> Any:
    """Import ``.client`` when one of its names is first asked for."""
    if name in _FROM_CLIENT:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
