"""Partitioning a dataset across simulated clients with ``flwr-datasets``.

:func:`partition_indices` wraps the answers in a ``datasets.Dataset`` and hands it to
``IidPartitioner`` (after a seeded shuffle, since that partitioner takes contiguous
shards) or ``DirichletPartitioner`` (label = the final answer, seeded, self-balancing).
Every client computes the same full partitioning, so the result is cached per
input in a small in-process LRU keyed on the answers themselves (a cache hit needs
equal inputs, so it cannot change results). :func:`train_test_split` gives each
client its own deterministic local test split.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

PARTITIONERS = ("iid", "dirichlet")


@functools.lru_cache(maxsize=8)
def _all_partitions(
    answers: tuple[str, ...], num_partitions: int, partitioner: str, seed: int, alpha: float
) -> tuple[np.ndarray, ...]:
    # flwr_datasets pulls in matplotlib and pandas (seconds); import it only when used
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = len(answers)
    if partitioner == "iid":
        order = np.random.default_rng(seed).permutation(n)
        ds = Dataset.from_dict({"idx": order.tolist(), "answer": [answers[i] for i in order]})
        part = IidPartitioner(num_partitions=num_partitions)
    else:
        ds = Dataset.from_dict({"idx": list(range(n)), "answer": list(answers)})
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="answer",
            alpha=alpha,
            min_partition_size=min(2, n // num_partitions),
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
    part.dataset = ds
    out = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        try:
            for pid in range(num_partitions):
                idx = np.sort(np.asarray(part.load_partition(pid)["idx"], dtype=np.int64))
                idx.setflags(write=False)
                out.append(idx)
        except ValueError as e:
            raise ValueError(
                f"{partitioner} partitioning of {n} examples into {num_partitions} partitions failed "
                f"(try a larger dirichlet_alpha or fewer partitions): {e}"
            ) from e
    return tuple(out)


def partition_indices(
    answers: list[str],
    num_partitions: int,
    partition_id: int,
    partitioner: str,
    seed: int,
    dirichlet_alpha: float = 0.5,
) -> np.ndarray:
    """Indices of the examples in one client's partition.

    Parameters
    ----------
    answers : list of str
        Final answer of every example (the Dirichlet label).
    num_partitions : int
        Number of clients (1 <= num_partitions <= len(answers)).
    partition_id : int
        This client's partition, in ``[0, num_partitions)``.
    partitioner : {"iid", "dirichlet"}
    seed : int
        Seed of the shuffle / Dirichlet sampling; same inputs give the same result.
    dirichlet_alpha : float
        Dirichlet concentration (> 0); smaller is more non-IID. Ignored for iid.

    Returns
    -------
    np.ndarray
        Sorted int64 example indices (a fresh array).
    """
    if partitioner not in PARTITIONERS:
        raise ValueError(f"Config key 'partitioner' must be one of {PARTITIONERS}, got {partitioner!r}")
    n = len(answers)
    if not 1 <= num_partitions <= n:
        raise ValueError(f"num_partitions must be in [1, {n}] (the number of examples), got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    alpha = 0.0
    if partitioner == "dirichlet":
        alpha = float(dirichlet_alpha)
        if not alpha > 0:
            raise ValueError(f"Config key 'dirichlet-alpha' must be > 0, got {dirichlet_alpha!r}")
    parts = _all_partitions(tuple(answers), int(num_partitions), partitioner, int(seed), alpha)
    return parts[partition_id].copy()


def train_test_split(indices: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of a client's indices into (train, test), both sorted.

    ``round(len * test_fraction)`` examples go to test, clamped to at least 1 and at
    most ``len - 1`` when there are at least 2 examples (a single example trains).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    idx = np.asarray(indices, dtype=np.int64)
    n = len(idx)
    n_test = min(max(round(n * test_fraction), 1), n - 1) if n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(idx[perm[n_test:]]), np.sort(idx[perm[:n_test]])
