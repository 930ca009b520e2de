"""Reference parsing, platform strings, hosts.toml and config loading (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lazyd.configfile import ConfigError, load_dataclass
from lazyd.registry import InvalidReferenceError, ManifestError, Platform, Reference, RegistryConfig, select_platform
from lazyd.registry.hosts import HostsConfigError, load_endpoints

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,expected", [
    ("ubuntu", ("docker.io", "library/ubuntu", "latest", None, "docker.io/library/ubuntu:latest")),
    ("docker.io/ubuntu:22.04", ("docker.io", "library/ubuntu", "22.04", None, "docker.io/library/ubuntu:22.04")),
    ("index.docker.io/library/ubuntu", ("docker.io", "library/ubuntu", "latest", None, "docker.io/library/ubuntu:latest")),
    ("foo/bar", ("docker.io", "foo/bar", "latest", None, "docker.io/foo/bar:latest")),
    ("127.0.0.1:5000/a/b:t", ("127.0.0.1:5000", "a/b", "t", None, "127.0.0.1:5000/a/b:t")),
    ("localhost/x", ("localhost", "x", "latest", None, "localhost/x:latest")),
    (f"ghcr.io/o/r@{D}", ("ghcr.io", "o/r", None, D, f"ghcr.io/o/r@{D}")),
    (f"r:tag@{D}", ("docker.io", "library/r", "tag", D, f"docker.io/library/r:tag@{D}")),
])
def test_parse_normalises_like_docker(text: str, expected: tuple) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest, str(ref)) == expected
    assert Reference.parse(str(ref)) == ref


@pytest.mark.parametrize("text,needle", [
    ("Ubuntu", "repository name"), ("a:", "tag"), ("x@sha256:zz", "digest"), ("", "empty"),
    ("a b", "repository"), ("host:5000/", "repository"), ("a/b:" + "t" * 200, "tag"),
])
def test_parse_rejects_bad_references(text: str, needle: str) -> None:
    with pytest.raises(InvalidReferenceError, match=needle):
        Reference.parse(text)


def test_platform_selection() -> None:
    index = {"manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "1" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "2" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "3" * 64, "size": 1,
         "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
    ]}
    assert select_platform(index, "linux/arm64", "x").digest.endswith("1" * 64)
    assert select_platform(index, "linux/x86_64", "x").digest.endswith("2" * 64)
    assert select_platform(index, "linux/arm/v7", "x").digest.endswith("3" * 64)
    assert select_platform(index, None, "x").platform["architecture"] == Platform.host().architecture
    with pytest.raises(ManifestError, match="no manifest for platform linux/s390x.*available: linux/amd64"):
        select_platform(index, "linux/s390x", "x")
    with pytest.raises(ManifestError, match="invalid platform"):
        Platform.parse("linux")


def test_hosts_toml_mirrors_then_upstream(tmp_path: Path) -> None:
    d = tmp_path / "registry.example.com"
    d.mkdir()
    (d / "ca.pem").write_text("x")
    (d / "hosts.toml").write_text('''
server = "https://registry.example.com"
[host."http://127.0.0.1:6000"]
  capabilities = ["pull", "resolve"]
  [host."http://127.0.0.1:6000".header]
    x-mirror = "yes"
[host."https://mirror.example.com/prefix"]
  capabilities = ["pull"]
  skip_verify = true
  ca = "ca.pem"
[host."https://other.example.com/custom/v2/x"]
  override_path = true
''')
    eps = load_endpoints("registry.example.com", tmp_path)
    assert [e.base_url for e in eps] == ["http://127.0.0.1:6000/v2", "https://mirror.example.com/prefix/v2",
                                         "https://other.example.com/custom/v2/x", "https://registry.example.com/v2"]
    assert [e.mirror for e in eps] == [True, True, True, False]
    assert eps[0].headers == (("x-mirror", "yes"),) and eps[0].capabilities == {"pull", "resolve"}
    assert eps[1].skip_verify and eps[1].ca == (str(d / "ca.pem"),)
    assert eps[3].capabilities == {"pull", "resolve", "push"}


def test_hosts_defaults_and_plain_http(tmp_path: Path) -> None:
    (eps,) = [load_endpoints("docker.io", tmp_path)]
    assert [e.base_url for e in eps] == ["https://registry-1.docker.io/v2"]
    (ep,) = load_endpoints("example.com:5000", tmp_path, ["example.com:5000"])
    assert ep.scheme == "http"
    (ep,) = load_endpoints("example.com:5000", tmp_path)
    assert ep.scheme == "https" and not ep.http_fallback
    (ep,) = load_endpoints("127.0.0.1:5000", tmp_path)
    assert ep.scheme == "https" and ep.http_fallback  # tries TLS first, HTTP only if the server has no TLS
    (tmp_path / "bad.io").mkdir()
    (tmp_path / "bad.io/hosts.toml").write_text('[host."https://m"]\ncapabilities = ["fly"]\n')
    with pytest.raises(HostsConfigError, match="unknown capability 'fly'"):
        load_endpoints("bad.io", tmp_path)
    (tmp_path / "bad.io/hosts.toml").write_text('server = [')
    with pytest.raises(HostsConfigError, match="bad.io/hosts.toml"):
        load_endpoints("bad.io", tmp_path)


def test_registry_config_loads_from_toml_table() -> None:
    cfg = load_dataclass(RegistryConfig, {"hosts_dir": "/x", "timeout": 5, "retries": 1, "plain_http": ["a:1"],
                                          "docker_config": "/c.json"})
    assert cfg.timeout == 5.0 and cfg.plain_http == ["a:1"] and cfg.hosts_dir == "/x"
    assert RegistryConfig().hosts_dir == "/etc/containerd/certs.d" and RegistryConfig().docker_config is None
    with pytest.raises(ConfigError, match="retrys"):
        load_dataclass(RegistryConfig, {"retrys": 1})
