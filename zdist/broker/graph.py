"""The broker's task graph: the only module that imports networkx.

Edges point from a dependency to its dependents. The scheduling state (which task is
ready, where results live) is kept by :mod:`zdist.broker.state`; this module knows only
the shape of the graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import networkx as nx


class TaskGraph:
    __slots__ = ("_g", "_pred", "_succ")

    def __init__(self) -> None:
        self._g = nx.DiGraph()
        # networkx's adjacency dicts, read directly on the hot path
        self._succ = self._g._succ
        self._pred = self._g._pred

    def __contains__(self, key: object) -> bool:
        return key in self._succ

    def __len__(self) -> int:
        return len(self._succ)

    def add(self, key: str, deps: Sequence[str]) -> None:
        """Add ``key`` with edges from each of ``deps`` (which must be in the graph)."""
        g = self._g
        g.add_node(key)
        for d in deps:
            g.add_edge(d, key)

    def remove(self, key: str) -> None:
        self._g.remove_node(key)

    def dependents(self, key: str) -> Iterable[str]:
        return self._succ[key]

    def dependencies(self, key: str) -> Iterable[str]:
        return self._pred[key]

    def n_dependents(self, key: str) -> int:
        return len(self._succ[key])

    def n_edges(self) -> int:
        return self._g.number_of_edges()


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
