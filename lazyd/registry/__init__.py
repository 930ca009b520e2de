"""OCI distribution client: references, hosts.toml, auth, manifests, range GETs and push."""

from .client import RegistryClient, select_platform
from .config import RegistryConfig
from .errors import (DigestMismatchError, InvalidReferenceError, ManifestError, NotFoundError,
                     RangeNotSupportedError, RegistryError, UnauthorizedError, UnreachableError)
from .platforms import Platform
from .reference import Reference
from .types import Descriptor, Image, RegistryStats

__all__ = [
    "Descriptor", "DigestMismatchError", "Image", "InvalidReferenceError", "ManifestError", "NotFoundError",
    "Platform", "RangeNotSupportedError", "Reference", "RegistryClient", "RegistryConfig", "RegistryError",
    "RegistryStats", "UnauthorizedError", "UnreachableError", "select_platform",
]
