"""Task arguments and values to frames and back (zdist.serialize), without sockets."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zdist import serialize
from zdist.serialize import KeyRef

pytestmark = pytest.mark.timeout(60)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.complex_numbers(allow_nan=False),
)
plain = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=40),
        st.lists(inner, max_size=40).map(tuple),
        st.dictionaries(st.text(max_size=5), inner, max_size=40),
    ),
    max_leaves=60,
)


def _no_lookup(key: str) -> Any:
    raise AssertionError(f"looked up {key!r}")


@settings(max_examples=300, deadline=None)
@given(plain)
def test_plain_arguments_round_trip_with_no_references(args: Any) -> None:
    frames, deps = serialize.dumps_args((args, {}))
    assert deps == []
    assert serialize.loads_args(frames, _no_lookup) == (args, {})


@settings(max_examples=100, deadline=None)
@given(plain)
def test_references_are_found_beside_and_inside_plain_data(args: Any) -> None:
    obj = ((args, KeyRef("a")), {"k": [args, {"deep": (KeyRef("b"), KeyRef("a"))}]})
    frames, deps = serialize.dumps_args(obj)
    assert deps == ["a", "b"]  # in order, once each
    got = serialize.loads_args(frames, lambda key: f"value-of-{key}")
    assert got == (
        (args, "value-of-a"),
        {"k": [args, {"deep": ("value-of-b", "value-of-a")}]},
    )


def test_plain_arguments_take_one_plain_pickle() -> None:
    frames, deps = serialize.dumps_args(((1, "x", b"y", None), {"n": 2.5}))
    assert deps == []
    assert len(frames) == 1
    assert pickle.loads(frames[0]) == ((1, "x", b"y", None), {"n": 2.5})


def test_arrays_still_travel_out_of_band_and_main_functions_by_value() -> None:
    big = np.arange(100_000)
    frames, deps_ = serialize.dumps_args(((big,), {}))
    assert len(frames) == 2  # the pickle and the array's buffer
    assert deps_ == []
    (got,), _ = serialize.loads_args(frames, _no_lookup)
    assert np.array_equal(got, big)

    def local(x: int) -> int:  # not importable by name: needs cloudpickle
        return x + 1

    frames, _ = serialize.dumps_args(((local, 1), {}))
    (fn, one), _ = serialize.loads_args(frames, _no_lookup)
    assert fn(one) == 2
