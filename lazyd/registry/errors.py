"""Typed errors of the registry client.

Messages name the registry, repository and scope involved, never a credential.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every registry client error."""


class InvalidReferenceError(RegistryError, ValueError):
    """An image reference that cannot be parsed."""


class NotFoundError(RegistryError):
    """A manifest, blob or repository does not exist (HTTP 404)."""


class UnauthorizedError(RegistryError):
    """The registry refused the credentials (or their absence) for a scope."""


class UnreachableError(RegistryError):
    """No endpoint of the registry could be reached (connection, TLS, timeout or 5xx)."""


class RangeNotSupportedError(RegistryError):
    """The registry answered a range request with something unusable."""


class DigestMismatchError(RegistryError):
    """Downloaded content does not hash to the digest it was requested by."""


class ManifestError(RegistryError):
    """A manifest or index is malformed, of an unknown type, or lacks the wanted platform."""


class ResponseTooLargeError(RegistryError):
    """An answer carries more bytes than the request allows (a misbehaving or hostile server)."""
