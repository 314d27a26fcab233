"""Task-key groups (zdist.keys): dask's key_split, remembered per key head."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(60)


_token = st.one_of(
    st.integers(0, 10**6).map(str),
    st.text("0123456789abcdef", min_size=8, max_size=32),
    st.text("abcxyz_", min_size=1, max_size=6),
)
_part = st.one_of(_token, st.sampled_from(["", "inc", "x", "sum", "0", "ffffffff"]))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.lists(_part, min_size=1, max_size=5), min_size=1, max_size=30))
def test_key_group_remembers_nothing_split_key_would_not_say(
    keys: list[list[str]],
) -> None:
    from zdist import keys as K

    K._BY_HEAD.clear()
    for parts in keys:
        key = "-".join(parts)
        assert K.key_group(key) == K.split_key(key), key
        assert K.key_group(key) == K.split_key(key), key  # and when remembered
    assert K.key_group("('inc-ab12cd34ef', 0, 1)") == "inc"
    assert K.key_group("inc-1d26b2a1c3e4f5a6") == "inc"
