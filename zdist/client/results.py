"""Reading results back: the futures inside nested structures, results put back in
those structures, and values fetched from the broker."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from zdist import protocol as P
from zdist import serialize
from zdist.client.future import Future
from zdist.errors import CommClosedError

if TYPE_CHECKING:
    from zdist.client.client import Client


def gather_results(client: Client, futures: Any, errors: str) -> Any:
    """Wait for (a structure of) futures and return their values in the same
    structure; with ``errors="skip"``, failed ones are left out."""
    flat = _flatten_futures(futures)
    for f in flat:
        f._wait()
    values: dict[str, Any] = {}
    fetch = []
    for f in flat:
        st = f._state
        if st.status == "finished":
            if st.frames is None and not st.has_value():
                fetch.append(f)
            else:
                values[f.key] = st.value()
        elif errors == "raise":
            raise st.exception()
    if fetch:
        for f, v in zip(fetch, fetch_values(client, fetch, None), strict=False):
            values[f.key] = v
    return _pack_futures(futures, values, errors == "skip")


def fetch_values(
    client: Client, futures: list[Future], timeout: float | None
) -> list[Any]:
    """Ask the broker for the values of ``futures`` (which are finished)."""
    keys = list(dict.fromkeys(f.key for f in futures))
    req_id, slot = client._conn.request(lambda r: P.Gather(r, keys), expect=1 << 30)
    got: dict[str, Any] = {}
    missing: list[str] = []
    # Replies may come in parts (one per worker holding data); collect until every
    # key is answered.
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    try:
        while len(got) + len(missing) < len(keys):
            remaining = (
                None if deadline is None else max(0, deadline - time.monotonic())
            )
            if not slot.event.wait(0.05 if remaining is None else min(0.05, remaining)):
                if slot.lost:
                    raise CommClosedError(slot.lost)
                if client._conn.closed:
                    raise CommClosedError("client closed while gathering")
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("gather timed out")
            for msg, payload in slot.replies[seen:]:
                seen += 1
                if isinstance(msg, P.Error):
                    raise CommClosedError(msg.text)
                assert isinstance(msg, P.DataReply)
                for key, ref in msg.values:
                    got[key] = serialize.loads(P.ref_frames(payload, ref))
                missing.extend(msg.missing)
            slot.event.clear()
    finally:
        client._conn._requests.pop(req_id, None)
    if missing:
        from zdist.errors import FutureLostError

        raise FutureLostError(f"the broker no longer holds {missing[:5]}")
    for f in futures:
        f._state.set_value(got[f.key])
    return [got[f.key] for f in futures]


def _flatten_futures(x: Any) -> list[Future]:
    if isinstance(x, Future):
        return [x]
    if isinstance(x, Mapping):
        return [f for v in x.values() for f in _flatten_futures(v)]
    if isinstance(x, (list, tuple, set, frozenset, Iterator)):
        return [f for v in x for f in _flatten_futures(v)]
    return []


class _Skip:
    pass


def _pack_futures(x: Any, values: dict[str, Any], skip: bool) -> Any:
    if isinstance(x, Future):
        return values.get(x.key, _Skip) if skip else values[x.key]
    if isinstance(x, Mapping):
        out = {k: _pack_futures(v, values, skip) for k, v in x.items()}
        return {k: v for k, v in out.items() if v is not _Skip}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = [_pack_futures(v, values, skip) for v in x]
        items = [v for v in items if v is not _Skip]
        return type(x)(items) if not isinstance(x, (set, frozenset)) else items
    return x
