"""The broker's task graph: the only module that imports networkx.

Edges point from a dependency to its dependents. The scheduling state (which task is
ready, where results live) is kept by :mod:`zdist.broker.state`; this module knows only
the shape of the graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import networkx as nx


class TaskGraph:
    """A networkx DiGraph of task keys, filled through its adjacency dicts.

    ``DiGraph.add_node``/``add_edge`` cost ~15 us per call (argument handling, an
    attribute dict per node and edge, cache invalidation); the broker adds and removes
    a node per task, so this class writes networkx's own ``_succ``/``_pred``/``_node``
    structures directly, with one shared empty attribute dict. ``self.nx`` remains a
    valid DiGraph for networkx's algorithms (read-only: never set attributes on it).
    """

    __slots__ = ("_node", "_pred", "_succ", "nx")

    def __init__(self) -> None:
        self.nx = nx.DiGraph()
        self._succ = self.nx._succ
        self._pred = self.nx._pred
        self._node = self.nx._node

    def __contains__(self, key: object) -> bool:
        return key in self._succ

    def __len__(self) -> int:
        return len(self._succ)

    def add(self, key: str, deps: Sequence[str]) -> None:
        """Add ``key`` with edges from each of ``deps`` (which must be in the graph)."""
        succ = self._succ
        pred: dict[str, Any] = {}
        for d in deps:
            succ[d][key] = _NO_ATTRS
            pred[d] = _NO_ATTRS
        succ[key] = {}
        self._pred[key] = pred
        self._node[key] = _NO_ATTRS

    def remove(self, key: str) -> None:
        succ, pred = self._succ, self._pred
        for d in pred.pop(key):
            del succ[d][key]
        for d in succ.pop(key):
            del pred[d][key]
        del self._node[key]

    def dependents(self, key: str) -> Iterable[str]:
        return self._succ[key]

    def dependencies(self, key: str) -> Iterable[str]:
        return self._pred[key]

    def n_dependents(self, key: str) -> int:
        return len(self._succ[key])

    def n_edges(self) -> int:
        return self.nx.number_of_edges()


#: The attribute dict every node and edge shares (the broker stores no attributes).
_NO_ATTRS: dict[str, Any] = {}


def find_cycle(edges: Iterable[tuple[str, str]]) -> list[str] | None:
    """A cycle among ``(dependency, dependent)`` edges as a list of keys, or None."""
    g = nx.DiGraph()
    g.add_edges_from(edges)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return None
    return [u for u, _ in cycle]


def topological_order(graph: dict[str, Sequence[str]]) -> Iterator[str]:
    """Keys of ``{key: deps}`` in dependency order (raises on a cycle)."""
    g = nx.DiGraph()
    g.add_nodes_from(graph)
    g.add_edges_from((d, k) for k, deps in graph.items() for d in deps)
    return iter(nx.topological_sort(g))
