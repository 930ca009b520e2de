"""Platform strings (``os/arch[/variant]``) and matching against index entries."""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass
from typing import Any

from .errors import ManifestError

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm",
                 "i386": "386", "i686": "386"}


@dataclass(frozen=True)
class Platform:
    """An OCI platform; ``variant`` None matches any variant."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ManifestError(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/amd64")
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        variant = parts[2] if len(parts) == 3 else None
        if arch == "arm64" and variant == "v8":
            variant = None
        return cls(parts[0], arch, variant)

    @classmethod
    def host(cls) -> "Platform":
        """The platform of this machine."""
        machine = _platform.machine().lower()
        if machine.startswith("armv7"):
            return cls("linux", "arm", "v7")
        if machine.startswith("armv6"):
            return cls("linux", "arm", "v6")
        return cls("linux", _ARCH_ALIASES.get(machine, machine))

    def matches(self, desc_platform: dict[str, Any] | None) -> bool:
        if not desc_platform:
            return False
        arch = _ARCH_ALIASES.get(str(desc_platform.get("architecture", "")), str(desc_platform.get("architecture", "")))
        if desc_platform.get("os") != self.os or arch != self.architecture:
            return False
        variant = desc_platform.get("variant")
        if arch == "arm64" and variant == "v8":
            variant = None
        return self.variant is None or variant == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)
