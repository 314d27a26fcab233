"""The README's first command: a real computation on a LocalCluster.

Starts a broker and two worker processes on this machine, runs the seed tutorial's
snippet, a map/gather and a small graph, prints the answers, and shuts down.
"""

from __future__ import annotations

import operator

from zdist import Client, LocalCluster, progress


def slow_increment(x: int) -> int:
    return x + 1


def main() -> None:
    with (
        LocalCluster(n_workers=2, threads_per_worker=1) as cluster,
        Client(cluster) as client,
    ):
        print(cluster)
        future = client.submit(lambda x: x + 1, 10)
        print("submit(lambda x: x + 1, 10).result() =", future.result())

        futures = client.map(slow_increment, range(1000))
        progress(futures)
        print("sum of map(slow_increment, range(1000)) =", sum(client.gather(futures)))

        dsk = {"a": 1, "b": (slow_increment, "a"), "c": (operator.mul, "b", 21)}
        print("get(dsk, 'c') =", client.get(dsk, "c"))
        print(
            "workers:",
            sorted(w["name"] for w in client.scheduler_info()["workers"].values()),
        )


if __name__ == "__main__":
    main()
