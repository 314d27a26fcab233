"""The wire contract, with no sockets: every message round-trips; decode rejects
anything that is not a well-formed message of this version."""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

import msgpack
import pytest

from zdist import protocol as P

pytestmark = pytest.mark.timeout(30)

#: A sample value per field type (as spelled in the annotations), and values that
#: must be refused for it. ``True`` is refused wherever a number is expected.
SAMPLES: dict[str, Any] = {
    "str": "tcp://127.0.0.1:5555 é",
    "int": 2**40 + 7,
    "float": 1.25,
    "bool": True,
    "bytes": b"\x00\xffraw",
    "list": ["k-1", [0, 2], None, 3, {"nested": [1.5, b"b"]}],
    "dict": {"GPU": 2, "memory": 1.5, "names": ["a", "b"], "blob": b"\x01"},
}
WRONG: dict[str, list[Any]] = {
    "str": [1, b"bytes", None, ["s"]],
    "int": ["1", 1.0, True, None, [1]],
    "float": ["1.0", True, False, None],
    "bool": [1, 0, "true", None],
    "bytes": ["text", 1, None],
    "list": [{"a": 1}, "abc", 1, None],
    "dict": [[1, 2], "abc", 1, None],
}


def _annotation(field: dataclasses.Field[Any]) -> str:
    return field.type if isinstance(field.type, str) else field.type.__name__


def _base(annotation: str) -> tuple[str, bool]:
    """``'int | None'`` -> ``('int', True)``."""
    optional = annotation.endswith(" | None")
    name = annotation.removesuffix(" | None").split("[", 1)[0]
    return name, optional


def sample(cls: type[P.Message], none_for_optional: bool = False) -> P.Message:
    values = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name, optional = _base(_annotation(f))
        assert name in SAMPLES, f"no sample for {cls.__name__}.{f.name}: {name}"
        values.append(None if optional and none_for_optional else SAMPLES[name])
    return cls(*values)


ALL = sorted(P.message_types().items())


def header(values: list[Any]) -> bytes:
    return msgpack.packb(values, use_bin_type=True)


def frames_for(cls: type[P.Message], values: list[Any]) -> list[bytes]:
    return [P.VERSION + bytes((cls.op,)) + header(values)]


# --------------------------------------------------------------------------------------
# round trips


def test_every_op_is_declared_once_and_registered() -> None:
    types = P.message_types()
    assert sorted(types) == sorted(int(op) for op in P.Op)
    assert len(set(types.values())) == len(types)
    for op, cls in types.items():
        assert cls.op == op
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
        assert not hasattr(sample(cls), "__dict__")  # slotted


@pytest.mark.parametrize("op,cls", ALL, ids=[c.__name__ for _, c in ALL])
def test_round_trip(op: int, cls: type[P.Message]) -> None:
    msg = sample(cls)
    payload = [b"frame-0", b"", bytearray(b"frame-2")]
    frames = P.encode(msg, payload)
    assert frames[0][: P.HEAD] == P.VERSION + bytes((op,))
    assert frames[1:] == payload
    assert frames[1] is payload[0]  # payload frames pass through, never copied
    back, back_payload = P.decode(frames)
    assert type(back) is cls
    assert back == msg
    assert [getattr(back, n) for n in cls._fields] == [
        getattr(msg, n) for n in cls._fields
    ]
    assert back_payload == payload
    # and with no payload at all
    back2, none = P.decode(P.encode(msg))
    assert back2 == msg
    assert none == []


@pytest.mark.parametrize("op,cls", ALL, ids=[c.__name__ for _, c in ALL])
def test_round_trip_optional_none(op: int, cls: type[P.Message]) -> None:
    msg = sample(cls, none_for_optional=True)
    assert P.decode(P.encode(msg))[0] == msg


def test_decode_accepts_zmq_style_frames_and_buffers() -> None:
    class Frame:  # what recv_multipart(copy=False) gives: .bytes
        def __init__(self, b: bytes) -> None:
            self.bytes = b

    msg = P.Submit([["k", None, [0, 1], [], 0, 0, None, None, False]], ["k"])
    frames = P.encode(msg, [b"value"])
    for head in (Frame(frames[0]), memoryview(frames[0]), bytearray(frames[0])):
        back, payload = P.decode([head, frames[1]])
        assert back == msg
        assert payload == [b"value"]


def test_int_field_survives_as_int_and_float_field_takes_int() -> None:
    back, _ = P.decode(P.encode(P.Welcome(2, 10, {}, "")))
    assert isinstance(back, P.Welcome)
    assert back.heartbeat_interval == 2
    assert back.liveness == 10


def test_message_is_frozen() -> None:
    msg = P.FreeKeys(["a"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.keys = ["b"]  # type: ignore[misc]


def test_header_order_is_declaration_order() -> None:
    frames = P.encode(P.Gather(7, ["x", "y"]))
    assert msgpack.unpackb(frames[0][P.HEAD :]) == [7, ["x", "y"]]
    frames = P.encode(P.Cancel(["k"], True))
    assert msgpack.unpackb(frames[0][P.HEAD :]) == [["k"], True]


def test_trailing_fields_with_defaults_may_be_left_off_by_an_older_sender() -> None:
    older = [P.VERSION + bytes((P.Op.SUBMIT,)) + header([[], ["k"]])]
    back, _ = P.decode(older)
    assert back == P.Submit([], ["k"]) and back.release is None
    older = [P.VERSION + bytes((P.Op.RUN_TASKS,)) + header([[]])]
    assert P.decode(older)[0] == P.RunTasks([])
    for fields in (
        [[]],
        [[], ["k"], None, None, "extra"],
    ):  # a required one missing; too many
        with pytest.raises(P.ProtocolError, match="wrong shape"):
            P.decode([P.VERSION + bytes((P.Op.SUBMIT,)) + header(fields)])
    with pytest.raises(P.ProtocolError, match="release"):
        P.decode([P.VERSION + bytes((P.Op.SUBMIT,)) + header([[], [], "k"])])


def test_trailing_fields_at_their_defaults_are_left_off_for_an_older_reader() -> None:
    assert msgpack.unpackb(P.encode(P.Submit([], ["k"]))[0][P.HEAD :]) == [[], ["k"]]
    assert msgpack.unpackb(P.encode(P.RunTasks([]))[0][P.HEAD :]) == [[]]
    assert msgpack.unpackb(P.encode(P.GetData(1, ["k"]))[0][P.HEAD :]) == [1, ["k"]]
    with_release = P.Submit([], ["k"], ["old"])
    assert msgpack.unpackb(P.encode(with_release)[0][P.HEAD :]) == [[], ["k"], ["old"]]
    assert P.decode(P.encode(with_release))[0] == with_release
    assert P.decode(P.encode(P.RunTasks([], ["x"])))[0] == P.RunTasks([], ["x"])


# --------------------------------------------------------------------------------------
# decode rejects


def test_decode_rejects_no_frames() -> None:
    with pytest.raises(P.ProtocolError, match="no frames"):
        P.decode([])


@pytest.mark.parametrize("version", [b"ZD0", b"ZD1", b"", b"zd2", b"Z"])
def test_decode_rejects_wrong_version(version: bytes) -> None:
    frames = P.encode(P.Heartbeat({}))
    frames[0] = version + frames[0][len(P.VERSION) :]
    with pytest.raises(P.ProtocolError, match="version"):
        P.decode(frames)


@pytest.mark.parametrize("op", [b"", b"\x00", b"\xff", b"\x15"])
def test_decode_rejects_unknown_op(op: bytes) -> None:
    head = P.VERSION + op + header([{}])
    with pytest.raises(P.ProtocolError, match="unknown op"):
        P.decode([head if op else P.VERSION])


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # nothing
        b"\x92\x01",  # array of 2, one item missing
        b"\xc1",  # never-used byte
        header([1]) + b"\x00",  # trailing data
        b"\x91\xa2\xff\xfe",  # str with invalid utf-8
        b"\x91\x81\x91\x01\x01",  # map with an unhashable (list) key
    ],
)
def test_decode_rejects_undecodable_header(raw: bytes) -> None:
    frames = [P.VERSION + bytes((P.Op.FREE_KEYS,)) + raw]
    with pytest.raises(P.ProtocolError, match="undecodable FreeKeys header"):
        P.decode(frames)


@pytest.mark.parametrize(
    "values",
    [{"keys": []}, [], [[], []], "keys", 5, None],
    ids=["map", "empty", "too-long", "str", "int", "nil"],
)
def test_decode_rejects_wrong_shape(values: Any) -> None:
    frames = [P.VERSION + bytes((P.Op.FREE_KEYS,)) + header(values)]
    with pytest.raises(P.ProtocolError, match="wrong shape"):
        P.decode(frames)


def test_decode_rejects_fields_for_a_message_without_fields() -> None:
    assert P.decode([P.VERSION + bytes((P.Op.CLIENT_CLOSE,)) + header([])])[0] == (
        P.ClientClose()
    )
    with pytest.raises(P.ProtocolError, match="wrong shape"):
        P.decode([P.VERSION + bytes((P.Op.CLIENT_CLOSE,)) + header([1])])


def _wrong_type_cases() -> list[Any]:
    cases = []
    for _, cls in ALL:
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        for i, f in enumerate(fields):
            name, optional = _base(_annotation(f))
            for bad in WRONG[name]:
                if bad is None and optional:
                    continue
                cases.append(
                    pytest.param(cls, i, bad, id=f"{cls.__name__}.{f.name}={bad!r}")
                )
    return cases


@pytest.mark.parametrize("cls,index,bad", _wrong_type_cases())
def test_decode_rejects_wrong_field_types(
    cls: type[P.Message], index: int, bad: Any
) -> None:
    good = sample(cls)
    values = [getattr(good, n) for n in cls._fields]
    P.decode(frames_for(cls, values))  # the unchanged sample is fine
    values[index] = bad
    with pytest.raises(P.ProtocolError, match=rf"{cls.__name__}\.{cls._fields[index]}"):
        P.decode(frames_for(cls, values))


@pytest.mark.parametrize(
    "frames",
    [
        ["ZD2" + chr(P.Op.HEARTBEAT)],
        [3],
        [None],
    ],
    ids=["str-head", "int-head", "none-head"],
)
def test_decode_rejects_frames_that_are_not_bytes(frames: list[Any]) -> None:
    with pytest.raises(P.ProtocolError):
        P.decode(frames)


def test_decode_returns_payload_frames_untouched() -> None:
    big = b"x" * 100_000
    _, payload = P.decode([*P.encode(P.Heartbeat({})), big, b""])
    assert payload[0] is big
    assert payload == [big, b""]


# --------------------------------------------------------------------------------------
# frame references


def test_ref_frames_slices_payload() -> None:
    payload = [b"a", b"b", b"c", b"d"]
    assert P.ref_frames(payload, [0, 1]) == [b"a"]
    assert P.ref_frames(payload, [1, 3]) == [b"b", b"c", b"d"]
    assert P.ref_frames(payload, [3, 1]) == [b"d"]
    got = P.ref_frames(payload, [0, 4])
    assert got == payload
    assert got is not payload


@pytest.mark.parametrize(
    "ref",
    [
        None,
        [],
        [0],
        [0, 1, 2],
        (0, 1),
        [0, 0],
        [-1, 1],
        [0, -1],
        [3, 2],
        [4, 1],
        [0, 5],
        [True, 1],
        [0, True],
        [0.0, 1],
        ["0", "1"],
        {"start": 0, "count": 1},
        "0:1",
    ],
)
def test_ref_frames_rejects_bad_refs(ref: Any) -> None:
    with pytest.raises(P.ProtocolError, match="bad frame reference"):
        P.ref_frames([b"a", b"b", b"c", b"d"], ref)


# --------------------------------------------------------------------------------------
# FrameList


def test_frame_list_hands_out_refs_in_order() -> None:
    fl = P.FrameList()
    a = fl.add([b"a1", b"a2"])
    b = fl.add([b"b"], inline=False)
    empty = fl.add([])
    assert a == [0, 2]
    assert b == [2, 1]
    assert empty == [3, 0]
    assert fl.frames == [b"a1", b"a2", b"b"]
    assert P.ref_frames(fl.frames, a) == [b"a1", b"a2"]
    assert P.ref_frames(fl.frames, b) == [b"b"]


def test_frame_list_share_adds_the_same_object_once() -> None:
    fl = P.FrameList()
    fn = [b"pickled-function"]
    r1 = fl.add(fn, share=True, inline=False)
    r2 = fl.add(fn, share=True, inline=False)
    assert r1 == r2 == [0, 1]
    assert fl.frames == [b"pickled-function"]
    # without share the same object is added again
    assert fl.add(fn, inline=False) == [1, 1]
    # an equal but distinct list is not shared
    assert fl.add([b"pickled-function"], share=True, inline=False) == [2, 1]
    assert fl.frames == [b"pickled-function"] * 3


def test_frame_list_share_does_not_confuse_a_new_list_at_a_reused_address() -> None:
    # CPython reuses the address of a freed list for the next one: a share keyed on
    # id() alone would hand back the first list's ref for the second list's frames.
    fl = P.FrameList()
    refs = []
    for i in range(20):
        refs.append(fl.add([f"value-{i}".encode()], share=True, inline=False))
        gc.collect()
    assert [P.ref_frames(fl.frames, r) for r in refs] == [
        [f"value-{i}".encode()] for i in range(20)
    ]


def test_frame_list_refs_are_independent_lists() -> None:
    fl = P.FrameList()
    fn = [b"f"]
    r1 = fl.add(fn, share=True, inline=False)
    assert isinstance(r1, list)
    r1[0] = 99  # a caller mutating its ref must not corrupt later ones
    assert fl.add(fn, share=True, inline=False) == [0, 1]


def test_frame_list_carries_a_small_single_frame_in_the_header() -> None:
    fl = P.FrameList()
    small = b"x" * P.INLINE_FRAME
    assert fl.add([small]) == small
    assert fl.add([memoryview(b"abc")]) == b"abc"
    assert fl.add([bytearray(b"abc")]) == b"abc"
    assert fl.frames == []  # nothing became a frame
    big = b"y" * (P.INLINE_FRAME + 1)
    assert fl.add([big]) == [0, 1]
    assert fl.add([b"a", b"b"]) == [1, 2]  # several frames (out-of-band buffers)
    assert fl.add([b"f"], share=True, inline=False) == [3, 1]
    assert fl.frames == [big, b"a", b"b", b"f"]
    # and back through a message: the header carries the small one as bytes
    msg, payload = P.decode(
        P.encode(P.TaskUpdates([["k", "finished", fl.add([b"v"]), ""]]), fl.frames)
    )
    assert isinstance(msg, P.TaskUpdates)
    assert P.ref_frames(payload, msg.updates[0][2]) == [b"v"]


def test_frame_list_round_trips_through_a_message() -> None:
    fl = P.FrameList()
    fn = [b"fn"]
    entries = [
        ["a", fl.add(fn, share=True, inline=False), fl.add([b"args-a"]), [], None],
        [
            "b",
            fl.add(fn, share=True, inline=False),
            fl.add([b"args-b", b"b"]),
            [],
            None,
        ],
    ]
    msg, payload = P.decode(P.encode(P.RunTasks(entries), fl.frames))
    assert isinstance(msg, P.RunTasks)
    assert payload == [b"fn", b"args-b", b"b"]  # args-a rode in the header
    got = {
        key: (P.ref_frames(payload, f), P.ref_frames(payload, a))
        for key, f, a, _, _ in msg.tasks
    }
    assert got == {
        "a": ([b"fn"], [b"args-a"]),
        "b": ([b"fn"], [b"args-b", b"b"]),
    }


def test_encode_is_safe_from_several_threads() -> None:
    import threading

    errors: list[BaseException] = []
    msgs = [P.FreeKeys([f"k{i}-{j}" for j in range(50)]) for i in range(8)]

    def work(msg: P.FreeKeys) -> None:
        try:
            for _ in range(300):
                back, _ = P.decode(P.encode(msg))
                assert back == msg
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in msgs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    assert errors == []
