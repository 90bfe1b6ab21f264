"""Client partitioning (flwr-datasets) and the local train/test split."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.data import client_shard, generate_synthetic_vqa, partition_indices, train_test_split
from sim.data.partition import _all_partitions


@pytest.fixture(scope="module")
def examples():
    return generate_synthetic_vqa(800, seed=0, image_size=16)


@pytest.fixture(scope="module")
def answers(examples):
    return [e.answer for e in examples]


def _all(answers, k, kind, seed=0, alpha=0.5):
    return [partition_indices(answers, k, p, kind, seed, alpha) for p in range(k)]


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_partitions_disjoint_and_cover(answers, kind, k):
    parts = _all(answers, k, kind, alpha=0.3)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, unique
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(answers)
    assert set(joined.tolist()) == set(range(len(answers)))
    assert all(len(p) >= 2 for p in parts)


def test_iid_is_balanced_and_shuffled(answers):
    parts = _all(answers, 6, "iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert not np.array_equal(parts[0], np.arange(sizes[0]))  # not contiguous shards of the input


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_deterministic_and_seeded(answers, kind):
    a = _all(answers, 5, kind, seed=3)
    _all_partitions.cache_clear()
    b = _all(answers, 5, kind, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = _all(answers, 5, kind, seed=4)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_cache_hands_out_copies(answers):
    a = partition_indices(answers, 4, 0, "iid", 0)
    a[:] = -1
    assert (partition_indices(answers, 4, 0, "iid", 0) >= 0).all()


def _mean_tv(answers, parts):
    labels = sorted(set(answers))
    glob = np.array([Counter(answers)[l] for l in labels], dtype=float)
    glob /= glob.sum()
    tvs = []
    for p in parts:
        c = Counter(answers[i] for i in p)
        d = np.array([c[l] for l in labels], dtype=float)
        tvs.append(0.5 * np.abs(d / d.sum() - glob).sum())
    return float(np.mean(tvs))


def test_dirichlet_small_alpha_is_non_iid(answers):
    iid = _mean_tv(answers, _all(answers, 5, "iid"))
    dirichlet = _mean_tv(answers, _all(answers, 5, "dirichlet", alpha=0.1))
    assert dirichlet > 0.3 and dirichlet > 2 * iid, (iid, dirichlet)


def test_validation(answers):
    with pytest.raises(ValueError, match="'partitioner'.*iid.*dirichlet"):
        partition_indices(answers, 2, 0, "shards", 0)
    with pytest.raises(ValueError, match="partition_id"):
        partition_indices(answers, 2, 2, "iid", 0)
    with pytest.raises(ValueError, match="num_partitions"):
        partition_indices(answers[:3], 4, 0, "iid", 0)
    with pytest.raises(ValueError, match="dirichlet-alpha"):
        partition_indices(answers, 2, 0, "dirichlet", 0, dirichlet_alpha=0.0)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(np.arange(10), 1.0, 0)


def test_split_small_cases():
    tr, te = train_test_split(np.array([5]), 0.1, 0)
    assert tr.tolist() == [5] and te.tolist() == []
    tr, te = train_test_split(np.array([5, 9]), 0.01, 0)
    assert len(tr) == 1 and len(te) == 1
    tr, te = train_test_split(np.arange(100) * 2, 0.2, 1)
    assert len(te) == 20 and np.array_equal(te, train_test_split(np.arange(100) * 2, 0.2, 1)[1])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), frac=st.floats(0.01, 0.9), seed=st.integers(0, 2**32 - 1))
def test_split_partitions_its_input(n, frac, seed):
    idx = np.random.default_rng(0).choice(10 * n + 1, size=n, replace=False)
    tr, te = train_test_split(idx, frac, seed)
    assert set(tr.tolist()).isdisjoint(te.tolist())
    assert sorted(tr.tolist() + te.tolist()) == sorted(idx.tolist())
    assert (len(te) >= 1) == (n >= 2) and (len(tr) >= 1) == (n >= 1)


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_client_shards_cover_everything(examples, kind):
    k = 4
    seen = []
    for p in range(k):
        train, test = client_shard(examples, p, k, kind, 0, 0.5, 0.1)
        assert set(train).isdisjoint(test) and len(test) >= 1
        seen += train + test
    assert sorted(seen) == list(range(len(examples)))
    assert client_shard(examples, 1, k, kind, 0, 0.5, 0.1) == client_shard(examples, 1, k, kind, 0, 0.5, 0.1)
