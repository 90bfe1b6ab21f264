"""Data layer: VQA examples from the synthetic generator, the scikit-image case studies or
LLaVA JSON, and client shards.

``dataset`` is one of :data:`DATASETS`: ``synthetic`` (procedural shapes), ``llava-json``
(a user file), or a privacy case study built offline from images that ship with
scikit-image (``pathology``, ``retina``, ``faces``; provenance, licences and label
rules in :mod:`sim.data.casestudy` and docs/privacy.md). Case-study runs load the
*private* pool of their source images; the disjoint *public* pool is left for the
attacker's auxiliary data in the feature-inversion study.

:func:`load_examples` returns the whole dataset (cached per arguments in-process,
since every simulated client in a worker loads the same one); :func:`client_shard`
gives one client's (train, test) indices into it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .casestudy import CASE_STUDY_DATASETS, CASE_STUDY_VOCABULARIES
from .llava_json import BAD_RECORD_POLICIES, load_llava_json, write_llava_json
from .partition import PARTITIONERS, partition_indices, train_test_split
from .synthetic import ANSWERS, QUESTION_TYPES, generate_synthetic_vqa, synthetic_vocabulary
from .types import DataError, VQAExample

__all__ = [
    "ANSWERS",
    "CASE_STUDY_DATASETS",
    "CASE_STUDY_VOCABULARIES",
    "DATASETS",
    "PARTITIONERS",
    "QUESTION_TYPES",
    "DataError",
    "VQAExample",
    "bad_record_count",
    "client_shard",
    "generate_synthetic_vqa",
    "load_examples",
    "load_llava_json",
    "partition_indices",
    "synthetic_vocabulary",
    "train_test_split",
    "write_llava_json",
]

DATASETS = ("synthetic", "llava-json", *CASE_STUDY_DATASETS)
FEDERATION_POOL = "private"  # case-study runs never touch the public (attacker's) pool


@functools.lru_cache(maxsize=4)
def _load_cached(
    dataset: str, data_path: str, file_stamp: tuple[int, int] | None, image_size: int, num_samples: int, seed: int,
    on_bad_record: str, allow_outside_paths: bool,
) -> tuple[tuple[VQAExample, ...], int]:
    """The examples and how many bad records were skipped."""
    if dataset == "synthetic":
        return tuple(generate_synthetic_vqa(num_samples, seed, image_size)), 0
    if dataset in CASE_STUDY_DATASETS:
        return tuple(CASE_STUDY_DATASETS[dataset](num_samples, seed, image_size, FEDERATION_POOL)), 0
    examples, skipped = load_llava_json(data_path, image_size, on_bad_record, allow_outside_paths)
    if not examples:
        raise DataError(f"{data_path}: no usable records")
    return tuple(examples), skipped


def load_examples(
    dataset: str, data_path: str, image_size: int, num_samples: int, seed: int, on_bad_record: str = "error",
    allow_outside_paths: bool = False,
) -> list[VQAExample]:
    """Load a whole dataset (cached in-process per arguments).

    Parameters
    ----------
    dataset : {"synthetic", "llava-json", "pathology", "retina", "faces"}
    data_path : str
        LLaVA JSON file (required for ``llava-json``; ignored otherwise).
    image_size : int
        Image side in pixels (case studies: 16 to 384).
    num_samples : int
        Number of generated examples (``llava-json`` loads every record).
    seed : int
        Generator seed.
    on_bad_record : {"error", "skip"}
        Policy for bad LLaVA records.
    allow_outside_paths : bool
        Let LLaVA records name images outside the JSON file's folder (``data-allow-outside-paths``).

    Returns
    -------
    list of VQAExample
        A new list each call (the examples themselves are shared and read-only).
    """
    return list(_load(dataset, data_path, image_size, num_samples, seed, on_bad_record, allow_outside_paths)[0])


def _load(
    dataset: str, data_path: str, image_size: int, num_samples: int, seed: int, on_bad_record: str,
    allow_outside_paths: bool,
) -> tuple[tuple[VQAExample, ...], int]:
    if dataset not in DATASETS:
        raise ValueError(f"Config key 'dataset' must be one of {DATASETS}, got {dataset!r}")
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"Config key 'on-bad-record' must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
    stamp = None
    if dataset == "synthetic" or dataset in CASE_STUDY_DATASETS:
        data_path = ""
    else:
        if not data_path:
            raise ValueError("Config key 'data-path' is required when dataset='llava-json'")
        num_samples, seed = 0, 0  # unused by the JSON loader; keep one cache entry
        p = Path(data_path).expanduser().resolve()
        data_path = str(p)
        if p.is_file():  # a changed file is a different cache entry
            st = p.stat()
            stamp = (st.st_mtime_ns, st.st_size)
    return _load_cached(dataset, data_path, stamp, int(image_size), int(num_samples), int(seed), on_bad_record,
                        bool(allow_outside_paths))


def bad_record_count(
    dataset: str, data_path: str, image_size: int, num_samples: int, seed: int, on_bad_record: str = "error",
    allow_outside_paths: bool = False,
) -> int:
    """How many records :func:`load_examples` skipped (``on-bad-record=skip``) for these arguments."""
    return _load(dataset, data_path, image_size, num_samples, seed, on_bad_record, allow_outside_paths)[1]


def client_shard(
    examples: list[VQAExample],
    partition_id: int,
    num_partitions: int,
    partitioner: str,
    seed: int,
    dirichlet_alpha: float,
    test_fraction: float,
) -> tuple[list[int], list[int]]:
    """One client's (train, test) example indices: partition by final answer, then split locally.

    The local split is seeded by ``(seed, partition_id)`` so clients split differently.
    """
    part = partition_indices([ex.answer for ex in examples], num_partitions, partition_id, partitioner, seed,
                             dirichlet_alpha)
    split_seed = int(np.random.SeedSequence([int(seed), int(partition_id)]).generate_state(1)[0])
    train, test = train_test_split(part, test_fraction, split_seed)
    return train.tolist(), test.tolist()
