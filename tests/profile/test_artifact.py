"""The profile artifact (lazyd.profile.artifact): encode/decode, referrers index, and a real
round trip through Debian's docker-registry (distribution 2.8: no referrers API, so the
referrers tag schema is used)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator

import pytest
from aiohttp import web

from lazyd.profile import artifact
from lazyd.profile.artifact import (ARTIFACT_TYPE, ArtifactError, ProfileNotFoundError, add_referrer, decode_manifest,
                                    encode, newest_profile, referrers_tag)
from lazyd.profile.records import Record, dumps, loads
from lazyd.registry import Descriptor, ManifestError, Reference, RegistryClient, RegistryConfig
from lazyd.registry.types import MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, digest_of
from tests.registry.helpers import FrontLog, proxy_app, serve
from tests.support.registry import Registry, running_registry

SUBJECT = Descriptor(MEDIA_OCI_MANIFEST, "sha256:" + "c" * 64, 1234)


def blob(digest: str = SUBJECT.digest, n: int = 4) -> bytes:
    return dumps([Record(f"usr/bin/tool{i}", digest, i % 3) for i in range(n)]).encode()


def test_encode_decode_round_trip() -> None:
    art = encode(blob(), SUBJECT, "2026-12-03T10:00:00Z")
    doc = json.loads(art.manifest)
    assert doc["mediaType"] == MEDIA_OCI_MANIFEST and doc["artifactType"] == ARTIFACT_TYPE
    assert doc["config"] == {"mediaType": "application/vnd.oci.empty.v1+json",
                             "digest": digest_of(b"{}"), "size": 2}
    assert doc["layers"] == [{"mediaType": ARTIFACT_TYPE, "digest": digest_of(blob()), "size": len(blob()),
                              "data": base64.b64encode(blob()).decode()}]  # small: embedded
    assert doc["subject"] == {"mediaType": MEDIA_OCI_MANIFEST, "digest": SUBJECT.digest, "size": 1234}
    assert doc["annotations"] == {"org.opencontainers.image.created": "2026-12-03T10:00:00Z"}
    assert art.digest == digest_of(art.manifest)
    layer, created, data = decode_manifest(art.manifest, SUBJECT.digest, "x")
    assert (layer.digest, layer.size, created) == (art.blob_digest, len(blob()), "2026-12-03T10:00:00Z")
    assert data == blob()
    entry = art.descriptor()
    assert entry["artifactType"] == ARTIFACT_TYPE and entry["size"] == len(art.manifest)
    assert base64.b64decode(entry["data"]) == art.manifest


def test_large_content_is_not_embedded() -> None:
    big = blob(n=artifact.MAX_EMBEDDED // 50)
    assert len(big) > artifact.MAX_EMBEDDED
    art = encode(big, SUBJECT, "t")
    assert "data" not in json.loads(art.manifest)["layers"][0]
    layer, _, data = decode_manifest(art.manifest, SUBJECT.digest, "x")
    assert data is None and layer.size == len(big)


@pytest.mark.parametrize(("data", "why"), [
    ("%%%not base64", "not valid base64"),
    (base64.b64encode(b"other bytes").decode(), "does not match its descriptor"),
    (12, "not a base64 string"),
])
def test_embedded_data_must_be_the_content(data: object, why: str) -> None:
    doc = json.loads(encode(blob(), SUBJECT, "t").manifest)
    doc["layers"][0]["data"] = data
    with pytest.raises(ArtifactError, match=why):
        decode_manifest(json.dumps(doc).encode(), SUBJECT.digest, "profile X")
    entry = encode(blob(), SUBJECT, "t").descriptor() | {"data": data}
    with pytest.raises(ArtifactError, match=why):
        newest_profile(add_referrer(None, entry), "idx")


def test_encode_refuses_bad_records() -> None:
    with pytest.raises(ArtifactError, match="not JSON"):
        encode(b"garbage\n", SUBJECT)
    with pytest.raises(ArtifactError, match="another manifest"):
        encode(blob("sha256:" + "d" * 64), SUBJECT)


def _mutate(**changes: object) -> bytes:
    doc = json.loads(encode(blob(), SUBJECT, "t").manifest)
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("body", "why"), [
    (b"{", "not JSON"),
    (_mutate(mediaType=MEDIA_OCI_INDEX), "not an OCI image manifest"),
    (_mutate(artifactType="application/x-other"), "artifactType"),
    (_mutate(subject=None), "subject is None"),
    (_mutate(subject={"mediaType": MEDIA_OCI_MANIFEST, "digest": "sha256:" + "e" * 64, "size": 1}), "subject is"),
    (_mutate(layers=[]), "exactly one layer"),
    (_mutate(layers=[{"mediaType": "application/octet-stream", "digest": "sha256:" + "0" * 64, "size": 3}]),
     "layer media type"),
    (_mutate(layers=[{"mediaType": ARTIFACT_TYPE, "digest": "sha256:" + "0" * 64, "size": 1 << 30}]),
     "more than"),
    (b" " * (artifact.MAX_ARTIFACT_MANIFEST + 1), "more than"),
])
def test_decode_refuses(body: bytes, why: str) -> None:
    with pytest.raises(ArtifactError, match=why):
        decode_manifest(body, SUBJECT.digest, "profile X")


def test_referrers_index_helpers() -> None:
    other = {"mediaType": MEDIA_OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 10,
             "artifactType": "application/vnd.example.sbom"}
    first = encode(blob(), SUBJECT, "2026-01-01T00:00:00Z")
    second = encode(blob(n=2), SUBJECT, "2026-02-01T00:00:00Z")
    index = add_referrer(None, other)
    index = add_referrer(index, second.descriptor())
    index = add_referrer(index, first.descriptor())
    index = add_referrer(index, first.descriptor())  # the same digest again: replaced, not doubled
    doc = json.loads(index)
    assert doc["mediaType"] == MEDIA_OCI_INDEX
    assert [m["digest"] for m in doc["manifests"]] == [other["digest"], second.digest, first.digest]
    newest = newest_profile(index, "idx")
    assert newest is not None and newest[0].digest == second.digest  # by creation time, not position
    assert newest[1] is None  # an older profile's embedded manifest is dropped when another is added
    assert newest_profile(add_referrer(None, first.descriptor()), "idx")[1] == first.manifest
    assert newest_profile(add_referrer(None, other), "idx") is None
    assert referrers_tag(SUBJECT.digest) == "sha256-" + "c" * 64
    with pytest.raises(ArtifactError, match="not an image index"):
        newest_profile(b'{"x": 1}', "idx")


# -- against a real registry -----------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("profile-registry")) as reg:
        yield reg


def _client(reg: Registry) -> RegistryClient:
    return RegistryClient(RegistryConfig(plain_http=[reg.host]))


async def _push_image(client: RegistryClient, ref: Reference, salt: str) -> Descriptor:
    config = json.dumps({"architecture": "amd64", "os": "linux", "salt": salt,
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    await client.push_blob(ref, digest_of(config), config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": digest_of(config), "size": len(config)},
                           "layers": []}).encode()
    await client.put_manifest(ref, manifest, MEDIA_OCI_MANIFEST)
    return Descriptor(MEDIA_OCI_MANIFEST, digest_of(manifest), len(manifest))


def test_registry_round_trip_uses_the_referrers_tag(registry: Registry) -> None:
    ref = Reference.parse(f"{registry.host}/profiled/app:v1")

    async def go() -> None:
        async with _client(registry) as client:
            subject = await _push_image(client, ref, "round-trip")
            assert (await artifact.subject_of(client, ref)) == subject
            with pytest.raises(ProfileNotFoundError, match="no tag sha256-"):
                await artifact.pull(client, ref, subject.digest)
            data = blob(subject.digest, 6)
            pushed = await artifact.push(client, ref, data, subject, "2026-12-01T00:00:00Z")
            # distribution 2.8 stores the subject but has no referrers API: no OCI-Subject header
            assert pushed.method == "referrers-tag" and pushed.tag == referrers_tag(subject.digest)
            assert await client.referrers(ref, subject.digest, ARTIFACT_TYPE) is None
            index, _, _ = await client.get_manifest(ref.with_tag(pushed.tag))
            (entry,) = json.loads(index)["manifests"]
            assert entry["digest"] == pushed.digest and entry["artifactType"] == ARTIFACT_TYPE
            pulled = await artifact.pull(client, ref, subject.digest)
            assert pulled.method == "referrers-tag" and pulled.artifact_digest == pushed.digest
            assert pulled.data == data and loads(pulled.data.decode()) == loads(data.decode())
            # A newer profile is added to the same index and wins.
            newer = blob(subject.digest, 2)
            second = await artifact.push(client, ref, newer, subject, "2026-12-02T00:00:00Z")
            index, _, _ = await client.get_manifest(ref.with_tag(pushed.tag))
            assert [m["digest"] for m in json.loads(index)["manifests"]] == [pushed.digest, second.digest]
            assert (await artifact.pull(client, ref, subject.digest)).data == newer

    asyncio.run(go())


def test_registry_with_the_referrers_api_is_asked_first(registry: Registry) -> None:
    """A registry with the referrers API (a front over distribution that answers
    ``/referrers/<digest>`` with the index the tag schema stored): the profile comes from the
    API's answer, which the client parses once; an answer that is not an index is refused."""
    ref = Reference.parse(f"{registry.host}/profiled/api:v1")
    log = FrontLog()
    answer: dict[str, bytes] = {}

    async def referrers(request: web.Request, headers: dict[str, str]) -> web.StreamResponse | None:
        if "/referrers/" not in request.path:
            return None
        assert request.query.get("artifactType") == ARTIFACT_TYPE
        return web.Response(body=answer["index"], content_type=MEDIA_OCI_INDEX)

    async def go() -> None:
        async with _client(registry) as client:
            subject = await _push_image(client, ref, "api")
            data = blob(subject.digest, 5)
            pushed = await artifact.push(client, ref, data, subject, "2026-12-01T00:00:00Z")
            answer["index"], _, _ = await client.get_manifest(ref.with_tag(pushed.tag))
        async with serve(proxy_app(registry.url, log, hook=referrers)) as port:
            front = Reference.parse(f"127.0.0.1:{port}/profiled/api:v1")
            async with RegistryClient(RegistryConfig(plain_http=[front.registry])) as client:
                doc = await client.referrers(front, subject.digest, ARTIFACT_TYPE)
                assert doc is not None and [m["digest"] for m in doc["manifests"]] == [pushed.digest]
                pulled = await artifact.pull(client, front, subject.digest)
                assert pulled.method == "referrers-api" and pulled.artifact_digest == pushed.digest
                assert pulled.data == data
                assert log.count("GET", f"/referrers/{subject.digest}") == 2
                answer["index"] = b'{"schemaVersion": 2}'
                with pytest.raises(ManifestError, match="not an image index"):
                    await artifact.pull(client, front, subject.digest)

    asyncio.run(go())


def test_damaged_blob_in_the_registry_is_refused(registry: Registry) -> None:
    ref = Reference.parse(f"{registry.host}/profiled/damaged:v1")

    async def go() -> None:
        async with _client(registry) as client:
            subject = await _push_image(client, ref, "damaged")
            # Large enough not to be embedded in the manifest: the blob is fetched and verified.
            data = b'{"path":"etc/hostname","layerIndex":0}\n' * 500 + b'{"path":"damaged/blob","layerIndex":7}\n'
            assert len(data) > artifact.MAX_EMBEDDED
            await artifact.push(client, ref, data, subject)
            path = registry.blob_path(digest_of(data))
            path.write_bytes(path.read_bytes().replace(b"hostname", b"hostnamf"))
            with pytest.raises(Exception, match="does not match its digest"):
                await artifact.pull(client, ref, subject.digest)

    asyncio.run(go())


def test_profile_of_another_image_is_not_found(registry: Registry) -> None:
    ref = Reference.parse(f"{registry.host}/profiled/two:a")

    async def go() -> None:
        async with _client(registry) as client:
            a = await _push_image(client, ref, "a")
            b = await _push_image(client, ref.with_tag("b"), "b")
            await artifact.push(client, ref, blob(a.digest), a)
            with pytest.raises(ProfileNotFoundError):
                await artifact.pull(client, ref, b.digest)

    asyncio.run(go())
