"""Fuzz the message schemas (lazyd.api.messages): every message class's from-wire constructor
``from_args`` takes whatever msgpack can decode and returns a valid message or raises
ApiError("invalid_request"), never another exception.  Requests reach the handlers only
through it (lazyd.api.server, lazyd.fuse.worker), replies reach typed clients through it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from lazyd.api import messages, wire
from lazyd.api.messages import INVALID_REQUEST, ApiError, Message
from tests.fuzz.conftest import FUZZ, PROFILE, CaseCounter, guarded
from tests.fuzz.strategies import deep, msgpack_values

CLASSES = sorted((c for c in vars(messages).values()
                  if isinstance(c, type) and issubclass(c, Message) and c is not Message), key=lambda c: c.__name__)
REQUEST_CLASSES = sorted({args for args, _ in [*messages.OPS.values(), *messages.WORKER_OPS.values()]},
                         key=lambda c: c.__name__)


def over_the_wire(value: Any) -> Any:
    """``value`` as a peer's decoder hands it over (tuples become lists, limits applied)."""
    return wire.decode_body(wire.encode({"v": value})[4:])["v"]


def field_values(cls: type[Message]) -> st.SearchStrategy[dict[str, Any]]:
    """Maps with (some of) ``cls``'s field names and arbitrary values, sometimes an unknown key."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    known = st.dictionaries(st.sampled_from(names), msgpack_values, max_size=len(names)) if names else st.just({})
    return st.one_of(known, st.builds(lambda d, k, v: {**d, k: v}, known, st.text(max_size=8), msgpack_values))


def has_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value) or any(
        has_nan(v) for v in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()))


def check_from_args(cls: type[Message], args: Any) -> None:
    args = over_the_wire(args)
    out = guarded(lambda: cls.from_args(args), (ApiError,), max_bytes=4 * 1024 * 1024, max_seconds=2.0)
    event(f"{cls.__name__}: {'ApiError' if out.error else 'valid'}")
    if out.error is not None:
        assert out.error.code == INVALID_REQUEST, out.error  # "internal" would be a schema bug
        assert out.error.message and str(out.error)
        return
    msg = out.result
    assert isinstance(msg, cls)
    wire_form = msg.to_dict()
    again = cls.from_args(over_the_wire(wire_form))  # what a peer sends back parses to the same message
    if not has_nan(wire_form):
        assert again == msg


# CI: one target for the request classes and one for the rest, each drawing the class per case;
# the long run fuzzes every class as its own target.
GROUPS: list[tuple[str, tuple[type[Message], ...]]] = (
    [(c.__name__, (c,)) for c in CLASSES] if PROFILE == "long" else
    [("requests", tuple(REQUEST_CLASSES)), ("results", tuple(c for c in CLASSES if c not in REQUEST_CLASSES))])


@pytest.mark.parametrize("group", [g for _, g in GROUPS], ids=[name for name, _ in GROUPS])
@FUZZ
@given(data=st.data())
def test_from_args(cases: CaseCounter, group: tuple[type[Message], ...], data: st.DataObject) -> None:
    """Arbitrary msgpack values, and maps of the class's own field names with arbitrary values."""
    cases.hit()
    cls = data.draw(st.sampled_from(group))
    choices = [msgpack_values, field_values(cls)]
    if cls in VALID_ARGS:
        choices.append(nearly_valid(cls))
    check_from_args(cls, data.draw(st.one_of(choices)))


@st.composite
def nearly_valid(draw: st.DrawFn, cls: type[Message]) -> dict[str, Any]:
    """Valid args of ``cls`` with a field or two replaced by arbitrary values or dropped."""
    args = dict(VALID_ARGS[cls])
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(args) or ["x"]))
        if draw(st.integers(0, 4)) == 0:
            args.pop(name, None)
        else:
            args[name] = draw(msgpack_values)
    return args


D = "sha256:" + "a" * 64
VALID_ARGS: dict[type[Message], dict[str, Any]] = {
    messages.Empty: {},
    messages.FetchArgs: {"layer_digest": D, "chunks": [[10, 0]], "priority": "demand"},
    messages.MountArgs: {"ref": "r/x:y", "layer_digest": D, "mountpoint": "/m", "toc_digest": D, "prefetch_wait": True,
                        "trace": True},
    messages.UnmountArgs: {"mountpoint": "/m"},
    messages.CheckArgs: {"mountpoint": "/m"},
    messages.CacheArgs: {"action": "evict", "layer_digest": D},
    messages.FallbackArgs: {"ref": "r/x:y", "layer_digest": D, "reason": "why"},
    messages.ResolveArgs: {"ref": "r/x:y"},
    messages.PullArgs: {"ref": "r/x:y", "address": "/c.sock", "namespace": "ns", "snapshotter": "lazyd",
                        "plain_http": True, "hosts_dir": "/h", "pull_id": "p1"},
    messages.PullProgressArgs: {"pull_id": "p1"},
    messages.PromoteArgs: {"ref": "r/x:y", "layer_digest": None},
    messages.LayerStateArgs: {"mode": "manual", "layers": [{"layer_digest": D, "state": "local", "disk_bytes": 7}]},
    messages.WorkerMountArgs: {"mount_id": "m1", "mountpoint": "/m", "layer_digest": D, "toc_digest": D,
                               "toc_path": "/t", "blob_size": 5, "inodes_path": "/i"},
    messages.WorkerUnmountArgs: {"mount_id": "m1"},
    messages.TraceArgs: {"mountpoint": "/m"},
    messages.WorkerTraceArgs: {"mount_id": "m1"},
    messages.ProfilePutArgs: {"manifest_digest": D, "records": b'{"path":"a","layerIndex":0}\n'},
    messages.ProfileDigestArgs: {"manifest_digest": D},
}


def test_valid_args_cover_every_request() -> None:
    assert set(VALID_ARGS) == set(REQUEST_CLASSES)
    for cls, args in VALID_ARGS.items():
        assert cls.from_args(args).to_dict() == args


@pytest.mark.parametrize("cls", REQUEST_CLASSES, ids=lambda c: c.__name__)
def test_deep_values_are_refused(cls: type[Message]) -> None:
    """A value nested as deep as msgpack allows, in any field of valid args, is refused naming that
    field, without recursing into it (a comparison or repr of it would exceed Python's recursion limit)."""
    for name in VALID_ARGS[cls]:
        for as_map in (False, True):
            with pytest.raises(ApiError) as got:
                cls.from_args({**VALID_ARGS[cls], name: deep(None, 1000, as_map)})
            assert got.value.code == INVALID_REQUEST and name in got.value.message, got.value
    with pytest.raises(ApiError, match="expected a map"):
        cls.from_args(deep(None, 1000))
    with pytest.raises(ApiError, match="unknown field"):
        cls.from_args({**VALID_ARGS[cls], "junk": deep(None, 1000, True)})
