"""Image references, normalised the Docker way.

``ubuntu`` -> ``docker.io/library/ubuntu:latest``; ``host:5000/a/b@sha256:...`` keeps its
digest (and tag, when both are given).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidReferenceError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
_LEGACY_DOCKER_HOSTS = ("index.docker.io", "registry-1.docker.io")

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")
_DOMAIN = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")


def validate_digest(digest: str) -> str:
    """Return ``digest`` when it looks like ``algo:hex``; raise InvalidReferenceError otherwise."""
    if not DIGEST_RE.fullmatch(digest):
        raise InvalidReferenceError(f"invalid digest {digest!r}")
    return digest


@dataclass(frozen=True)
class Reference:
    """A normalised image reference; ``tag`` and ``digest`` may both be set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Reference":
        """Parse and normalise ``text``; raises InvalidReferenceError naming what was wrong."""
        if not text or text != text.strip():
            raise InvalidReferenceError(f"invalid image reference {text!r}: empty or surrounded by spaces")
        rest, digest = text, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            validate_digest(digest)
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise InvalidReferenceError(f"invalid tag {tag!r} in image reference {text!r}")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            if not _DOMAIN.fullmatch(first):
                raise InvalidReferenceError(f"invalid registry host {first!r} in image reference {text!r}")
            registry, path = first, remainder
        else:
            registry, path = DEFAULT_REGISTRY, rest
        if registry in _LEGACY_DOCKER_HOSTS:
            registry = DEFAULT_REGISTRY
        if registry == DEFAULT_REGISTRY and "/" not in path:
            path = f"library/{path}"
        if not path or len(path) > 255 or not all(_COMPONENT.fullmatch(c) for c in path.split("/")):
            raise InvalidReferenceError(
                f"invalid repository name {path!r} in image reference {text!r} "
                "(lowercase letters, digits and separators . _ __ - only)"
            )
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(registry=registry, repository=path, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def object(self) -> str:
        """What to ask the manifests endpoint for: the digest when known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.registry, self.repository, self.tag, validate_digest(digest))

    def with_tag(self, tag: str) -> "Reference":
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text
